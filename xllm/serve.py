"""An OpenAI-compatible chat endpoint for a trained model: ``python -m xllm.serve --checkpoint RUN``.

What it serves and refuses: ``xllm.demo.server``.
"""

from __future__ import annotations

import argparse

from xllm.demo.server import make_server, service_arguments, service_from


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    service_arguments(parser)
    args = parser.parse_args()
    service = service_from(args)
    server = make_server(service, args.host, args.port)
    print(f"serving {service.name!r} on http://{args.host}:{server.server_port}/v1/chat/completions")
    server.serve_forever()


if __name__ == "__main__":
    main()
