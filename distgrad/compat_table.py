"""Write the README's PyTorch compatibility table from the code (``distgrad.compat``).

    python -m distgrad.compat_table --write README.md     # regenerate
    python -m distgrad.compat_table --check README.md     # exit 1 if stale
"""
import argparse
import sys

from distgrad import compat


def main(argv=None):
    """``python -m distgrad.compat_table [--write README.md | --check README.md]``: print
    the table, write it between the README's markers, or fail if the README's is stale."""
    ap = argparse.ArgumentParser(description=main.__doc__)
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--write", metavar="README", help="replace the table in this file")
    group.add_argument("--check", metavar="README", help="exit 1 if this file's table is stale")
    args = ap.parse_args(argv)
    text = compat.table()
    path = args.write or args.check
    if path is None:
        print(text)
        return 0
    with open(path) as f:
        doc = f.read()
    if compat.BEGIN not in doc or compat.END not in doc:
        print(f"{path}: no {compat.BEGIN} ... {compat.END} markers", file=sys.stderr)
        return 1
    new = doc[:doc.index(compat.BEGIN)] + text + doc[doc.index(compat.END) + len(compat.END):]
    if args.check:
        if new != doc:
            print(f"{path}: the compatibility table is stale: run python -m distgrad.compat_table "
                  f"--write {path}", file=sys.stderr)
            return 1
        return 0
    with open(path, "w") as f:
        f.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
