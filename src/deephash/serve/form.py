"""A small multipart form (a search upload) parsed in one pass over its bytes.

Starlette's ``request.form()`` streams the body through python-multipart into a spooled temporary
file per upload, awaiting each chunk: built for large files, it took about a third of the search
service's event-loop time for uploads of a few kB (BENCHMARKS, "Search service"). A search's body
is already bounded (``--max-upload-mb``, read whole by the body limit), so here python-multipart's
parser runs once over the bytes and the parts are collected in memory.
"""

from __future__ import annotations

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from deephash.errors import DeephashError

__all__ = ["FormError", "parse_form"]


class FormError(DeephashError):
    """The body is not a well-formed multipart form, or it has more parts than allowed."""


def parse_form(body: bytes, content_type: str, max_files: int = 1, max_fields: int = 8) -> tuple[dict[str, str], dict[str, bytes]]:
    """The text fields and the files of a ``multipart/form-data`` body.

    Args:
        body: the whole request body.
        content_type: its ``Content-Type`` header (holds the boundary).
        max_files, max_fields: most file parts and most text parts.

    Returns:
        ``(fields, files)``: text fields by name and file contents by field name (a part is a
        file when its ``Content-Disposition`` names a ``filename``). As Starlette's form: text is
        decoded in the ``charset`` of the Content-Type (UTF-8 by default), Latin-1 where that fails,
        and a repeated name keeps its last value.

    Raises:
        FormError: no boundary, a malformed body, a part without a name, or too many parts.
    """
    _, params = parse_options_header(content_type)
    charset = params.get(b"charset", b"utf-8").decode("latin-1")
    try:
        "".encode(charset)
    except LookupError:
        charset = "latin-1"
    boundary = params.get(b"boundary")
    if not boundary:
        raise FormError("multipart body without a boundary in its Content-Type")
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    counts = {"files": 0, "fields": 0}
    part: dict[str, list[bytes]] = {}

    def on_part_begin() -> None:
        part.clear()
        part.update(headers=[], field=[], value=[], data=[])

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part["field"].append(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part["value"].append(data[start:end])

    def on_header_end() -> None:
        part["headers"].append((b"".join(part["field"]).lower(), b"".join(part["value"])))
        part["field"], part["value"] = [], []

    def on_part_data(data: bytes, start: int, end: int) -> None:
        part["data"].append(data[start:end])

    def on_part_end() -> None:
        disposition = next((value for name, value in part["headers"] if name == b"content-disposition"), b"")
        _, options = parse_options_header(disposition)
        name = options.get(b"name")
        if name is None:
            raise FormError("a multipart part has no name in its Content-Disposition")
        key = name.decode("latin-1")
        data = b"".join(part["data"])
        if b"filename" in options:
            counts["files"] += 1
            if counts["files"] > max_files:
                raise FormError(f"too many files in the form: at most {max_files}")
            files[key] = data
            return
        counts["fields"] += 1
        if counts["fields"] > max_fields:
            raise FormError(f"too many fields in the form: at most {max_fields}")
        try:
            fields[key] = data.decode(charset)
        except UnicodeDecodeError:
            fields[key] = data.decode("latin-1")

    parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                        "on_header_value": on_header_value, "on_header_end": on_header_end,
                                        "on_part_data": on_part_data, "on_part_end": on_part_end})
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as error:
        raise FormError(f"malformed multipart body: {error}") from None
    return fields, files
