"""The chat in a browser: ``python -m xllm.demo.web --checkpoint RUN``, then open the printed address.

A page (``page.html``) on the OpenAI-compatible server: attach an image, a recording or a video, ask, and read the
reply as it streams. It binds 127.0.0.1 unless ``--host`` says otherwise; uploads are limited in type (the
model's modalities) and size (``--max-request-mb``), by the page and again by the server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xllm.demo.server import Service, make_server, service_arguments, service_from

ACCEPT = {"image": "image/*", "speech": "audio/*", "video": "video/*"}


def render_page(service: Service) -> str:
    page = (Path(__file__).with_name("page.html")).read_text(encoding="utf-8")
    accept = ",".join(ACCEPT[m] for m in service.processors if m in ACCEPT)
    return (page.replace("MAX_REQUEST_BYTES", str(service.max_request_bytes))
            .replace('"MODEL_NAME"', json.dumps(service.name)).replace("ACCEPT", accept))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    service_arguments(parser)
    args = parser.parse_args()
    service = service_from(args)
    service.page = render_page(service)
    server = make_server(service, args.host, args.port)
    print(f"chat page on http://{args.host}:{server.server_port}/")
    server.serve_forever()


if __name__ == "__main__":
    main()
