"""``python -m xllm.zoo build tiny [--force]``: pre-train the tiny tier's frozen models."""

from __future__ import annotations

import argparse
import logging

from xllm.zoo import tiny


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m xllm.zoo")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("tier", choices=["tiny"])
    parser.add_argument("components", nargs="*", help=f"what to build (default: all of {', '.join(tiny.COMPONENTS)})")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    print(f"zoo:tiny ready in {tiny.build(args.components or None, force=args.force)}")


if __name__ == "__main__":
    main()
