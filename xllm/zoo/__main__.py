"""``python -m xllm.zoo build tiny|mini [components] [--force]``: pre-train a tier's frozen models."""

from __future__ import annotations

import argparse
import logging

from xllm.zoo import TIERS, find_tier


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m xllm.zoo")
    parser.add_argument("command", choices=["build"])
    parser.add_argument("tier", choices=TIERS)
    parser.add_argument("components", nargs="*", help="what to build (default: all of the tier's)")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache is current")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    zoo_tier = find_tier(args.tier)
    print(f"zoo:{args.tier} ready in {zoo_tier.build(args.components or None, force=args.force)}")


if __name__ == "__main__":
    main()
