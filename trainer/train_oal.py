"""The name users call: ``accelerate launch trainer/train_oal.py --config ...`` runs :mod:`trainer.train`.

Every method (``ce``, ``teacher``, ``oal``, ``oe``, ``energy_margin``, ``vos``, ``isomax_plus``) is
trained by :mod:`trainer.train`; this file keeps the command in the README and in users' scripts working.
"""

from trainer.train import main

if __name__ == "__main__":
    raise SystemExit(main())
