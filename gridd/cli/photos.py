"""gridctl photos: the photos pipeline's commands.

``rebuild-db`` and ``verify`` work on the two copies of the photos'
metadata — the documents in the object store and the rows of the SQL
catalog — and need no server. Exit status: 0 success (verify: the copies
agree); 1 rebuild-db skipped a bad document, or verify found differences;
2 bad usage (a store or catalog URL that names nothing); 3 the store or the
catalog cannot be reached or refused.
"""

from __future__ import annotations

import argparse
import json
from typing import TextIO

__all__ = ["add_photos_commands", "cmd_rebuild_db", "cmd_verify"]

EXIT_OK, EXIT_DIFFERENT, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3

_STORE_HELP = "the object store: file:///DIR, file://./DIR or s3://BUCKET/PREFIX?endpoint=URL"
_CATALOG_HELP = (
    "the SQL catalog: sqlite:///PATH.db, sqlite://./PATH.db or mysql://USER@HOST:PORT/DB?password_file=PATH"
    " (default: DIR.db next to a file: store, else ./gridd-photos.db)"
)


def add_photos_commands(commands) -> None:
    """Add ``gridctl photos ...`` to gridctl's subcommands."""
    photos = commands.add_parser(
        "photos",
        help="the photos pipeline: rebuild the SQL catalog from the object store, compare the two",
        description="The photos job type writes each photo's renditions and metadata document to an object "
        "store, and a row to an SQL catalog; each copy is the other's backup.",
    )
    actions = photos.add_subparsers(dest="photos_command", required=True, metavar="ACTION")
    from gridd.cli.photos_submit import add_submit  # it uses gridctl's helpers: imported once gridctl is

    add_submit(actions)
    rebuild = actions.add_parser(
        "rebuild-db",
        help="re-create the catalog's rows from the store's metadata documents (works offline)",
        description="Upsert one row per photos/*/*/meta.json in the store; rows of other photos stay.",
    )
    rebuild.add_argument("store", metavar="STORE_URL", help=_STORE_HELP)
    rebuild.add_argument("--catalog", metavar="URL", help=_CATALOG_HELP)
    rebuild.set_defaults(offline=cmd_rebuild_db)
    verify = actions.add_parser(
        "verify",
        help="compare the catalog with the store and report what differs (works offline)",
        description="Report photos without a row, rows without a document, rows unlike their document, "
        "renditions a document names and the store lacks, and photos whose document was never written.",
    )
    verify.add_argument("store", metavar="STORE_URL", help=_STORE_HELP)
    verify.add_argument("--catalog", metavar="URL", help=_CATALOG_HELP)
    verify.add_argument("--json", action="store_true", help="print the report as one JSON object")
    verify.set_defaults(offline=cmd_verify)


def _open(args: argparse.Namespace, err: TextIO):
    """(store, catalog), or an exit status after saying why not."""
    from gridd.photos.catalog import CatalogError, default_catalog_url, open_catalog
    from gridd.photos.storage import open_store

    try:
        store = open_store(args.store)
        catalog = open_catalog(args.catalog or default_catalog_url(args.store))
    except ValueError as e:
        print(f"gridctl: error: {e}", file=err)
        return EXIT_USAGE
    except CatalogError as e:
        print(f"gridctl: {e}", file=err)
        return EXIT_UNAVAILABLE
    return store, catalog


def _run(args: argparse.Namespace, err: TextIO, work) -> int:
    from gridd.photos.catalog import CatalogError
    from gridd.photos.storage import StorageError

    opened = _open(args, err)
    if isinstance(opened, int):
        return opened
    store, catalog = opened
    try:
        return work(store, catalog)
    except (StorageError, CatalogError) as e:
        print(f"gridctl: {e}", file=err)
        return EXIT_UNAVAILABLE
    finally:
        catalog.close()


def cmd_rebuild_db(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``gridctl photos rebuild-db STORE_URL``: a row for every photo document in the store."""
    from gridd.photos.catalog import rebuild

    def work(store, catalog) -> int:
        report = rebuild(catalog, store)
        for key, why in report.errors:
            print(f"gridctl: skipped {store.url(key)}: {why}", file=err)
        skipped = f"; {len(report.errors)} bad document(s) skipped" if report.errors else ""
        print(f"rebuilt {report.rows} photo row(s) in {catalog.describe()} from {args.store}{skipped}", file=out)
        return EXIT_DIFFERENT if report.errors else EXIT_OK

    return _run(args, err, work)


def cmd_verify(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """``gridctl photos verify STORE_URL``: what differs between the store and the catalog."""
    from gridd.photos.catalog import verify

    def work(store, catalog) -> int:
        report = verify(catalog, store)
        findings = [
            ("no row in the catalog", report.missing_rows),
            ("no document in the store", report.missing_documents),
            ("row differs from the document", report.differing),
            ("rendition missing from the store", [f"{sha} {key}" for sha, key in report.missing_outputs]),
            ("unreadable document", [f"{key}: {why}" for key, why in report.unreadable]),
            ("renditions without a document (being written, or a failed attempt)", report.incomplete),
        ]
        if args.json:
            value = {
                "ok": report.ok,
                "checked": report.checked,
                "missing_rows": report.missing_rows,
                "missing_documents": report.missing_documents,
                "differing": report.differing,
                "missing_outputs": [list(item) for item in report.missing_outputs],
                "unreadable": [list(item) for item in report.unreadable],
                "incomplete": report.incomplete,
            }
            out.write(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
        else:
            for what, items in findings:
                for item in items:
                    print(f"{what}: {item}", file=out)
            verdict = "the copies agree" if report.ok else "the copies differ"
            print(f"{report.checked} photo(s) checked in {args.store} and {catalog.describe()}: {verdict}", file=out)
        return EXIT_OK if report.ok else EXIT_DIFFERENT

    return _run(args, err, work)
