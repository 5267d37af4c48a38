"""``multipart/form-data`` bodies parsed into memory, with header limits that fit what real clients send.

Starlette's form parser keeps python-multipart's limit of 4,224 bytes per part header line, so an
upload whose filename is a few thousand characters long failed as "Invalid multipart data" (a 400 that
did not say why). Here the same streaming parser (python-multipart) runs with ``max_header_bytes``
(64 KiB by default) per header line, and every file part is kept in memory as ``bytes``: the body is
already bounded by ``limits.max_body_bytes``, and it saves the temporary-file writes and thread hops of
``UploadFile``.

Example:
    >>> parts = await read_multipart(request.headers["content-type"], request.stream(), max_files=64)
    >>> [(p.name, p.filename, len(p.data)) for p in parts]
    [('files', 'cat.png', 5120)]
"""

from __future__ import annotations

import codecs
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_HEADER_BYTES = 64 * 1024  # one part header line (a Content-Disposition with a 60,000-character filename)
MAX_HEADERS = 16  # header lines per part


class MultipartError(ValueError):
    """A body that is not valid ``multipart/form-data``; ``too_many_files`` marks the count limit."""

    def __init__(self, message: str, too_many_files: bool = False) -> None:
        """Keep what went wrong."""
        super().__init__(message)
        self.message = message
        self.too_many_files = too_many_files


@dataclass
class Part:
    """One part of the body: its field name, filename (``None`` for a text field) and content."""

    name: str
    filename: str | None
    content_type: str
    data: bytes


@dataclass
class _Collector:
    """python-multipart callbacks that build :class:`Part` objects."""

    charset: str
    max_files: int
    max_fields: int
    parts: list[Part] = field(default_factory=list)
    _headers: dict[bytes, bytes] = field(default_factory=dict)
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _data: list[bytes] = field(default_factory=list)
    _part: Part | None = None
    _files: int = 0
    _fields: int = 0
    ended: bool = False

    def _text(self, raw: bytes) -> str:
        try:
            return raw.decode(self.charset)
        except (UnicodeDecodeError, LookupError):
            return raw.decode("latin-1")

    def on_part_begin(self) -> None:
        self._headers, self._data, self._part = {}, [], None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._field).lower()] = bytes(self._value)
        self._field, self._value = bytearray(), bytearray()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise MultipartError(
                'a part has no Content-Disposition: form-data; name="..." header; every part needs one'
            )
        filename = options.get(b"filename")
        if filename is not None:
            self._files += 1
            if self._files > self.max_files:
                raise MultipartError(f"more than {self.max_files} files", too_many_files=True)
        else:
            self._fields += 1
            if self._fields > self.max_fields:
                raise MultipartError(f"more than {self.max_fields} text fields; send only the files")
        self._part = Part(
            name=self._text(options[b"name"]),
            filename=None if filename is None else self._text(filename),
            content_type=self._headers.get(b"content-type", b"").decode("latin-1"),
            data=b"",
        )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self._data.append(data[start:end])

    def on_part_end(self) -> None:
        if self._part is not None:
            self._part.data = b"".join(self._data)
            self.parts.append(self._part)
        self._data, self._part = [], None

    def on_end(self) -> None:
        self.ended = True

    def callbacks(self) -> dict[str, object]:
        names = ("part_begin", "part_data", "part_end", "header_field", "header_value", "header_end")
        return {f"on_{n}": getattr(self, f"on_{n}") for n in (*names, "headers_finished", "end")}


async def read_multipart(
    content_type: str,
    chunks: AsyncIterator[bytes],
    *,
    max_files: int,
    max_fields: int = 100,
    max_header_bytes: int = MAX_HEADER_BYTES,
) -> list[Part]:
    """Every part of a ``multipart/form-data`` body, in order.

    Args:
        content_type: The request's ``Content-Type`` header (it carries the boundary).
        chunks: The body, in chunks (already bounded in size by the caller).
        max_files: Most file parts; one more raises :class:`MultipartError` with ``too_many_files``.
        max_fields: Most text fields.
        max_header_bytes: Longest header line of one part.

    Raises:
        MultipartError: no boundary, a malformed body, a part without a name, too many parts.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise MultipartError("the Content-Type header has no boundary=...")
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        charset = codecs.lookup(charset).name
    except LookupError:
        charset = "latin-1"
    collector = _Collector(charset=charset, max_files=max_files, max_fields=max_fields)
    parser = MultipartParser(
        boundary,
        collector.callbacks(),  # type: ignore[arg-type]
        max_header_count=MAX_HEADERS,
        max_header_size=max_header_bytes,
    )
    try:
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as err:
        raise MultipartError(_reason(err, max_header_bytes)) from None
    if not collector.ended:
        raise MultipartError("the body ends before its closing boundary; send the complete body")
    return collector.parts


def _reason(err: FormParserError, max_header_bytes: int) -> str:
    text = str(err)
    if "header size" in text.lower():
        return (
            f"a part header line is longer than {max_header_bytes} bytes (a very long filename?); shorten it"
        )
    if "header" in text.lower() and "count" in text.lower():
        return f"a part has more than {MAX_HEADERS} header lines"
    return f"invalid multipart data: {text}"
