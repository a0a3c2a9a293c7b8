"""The ``distgrad`` command: ``distgrad tutorial``, ``distgrad info`` (more in later issues)."""
import argparse
import runpy
import sys


def _tutorial(args):
    # examples/ is installed as distgrad.examples, so this works from a wheel too.
    runpy.run_module("distgrad.examples.autograd_tutorial", run_name="__main__")
    return 0


def _info(args):
    import numpy
    import distgrad
    print(f"distgrad {distgrad.__version__}")
    print(f"numpy {numpy.__version__}")
    for mod in ("cupy", "ray", "msgpack"):
        try:
            m = __import__(mod)
            print(f"{mod} {getattr(m, '__version__', '?')}")
        except ImportError:
            print(f"{mod} not installed")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(prog="distgrad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("tutorial", help="run the seed autograd tutorial").set_defaults(fn=_tutorial)
    sub.add_parser("info", help="print versions").set_defaults(fn=_info)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
