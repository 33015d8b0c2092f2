"""Chat with a trained model in the terminal: ``python -m xllm.demo.cli --checkpoint RUN``.

Type a question; ``/image PATH``, ``/speech PATH``, ``/video PATH`` attach a medium to the next question,
``/reset`` starts over, ``/quit`` (or end of input) leaves. Replies stream as they are generated.
"""

from __future__ import annotations

import argparse
import sys

from xllm.common.logging import setup_logging
from xllm.demo.session import ChatSession, load_run

COMMANDS = {"/image": "image", "/speech": "speech", "/video": "video"}


def chat(session: ChatSession, lines, out) -> None:
    """Runs the conversation over ``lines`` (the terminal's input), writing to ``out``."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        command, _, argument = line.partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
        elif command in COMMANDS:
            try:
                session.attach(COMMANDS[command], argument.strip())
                out.write(f"({COMMANDS[command]} attached: {argument.strip()})\n")
            except (OSError, ValueError) as error:
                out.write(f"(not attached: {error})\n")
        else:
            shown = ""
            out.write("xllm: ")
            for reply in session.ask(line):
                out.write(reply[len(shown):] if reply.startswith(shown) else "\n" + reply)
                out.flush()
                shown = reply
            out.write("\n")
        out.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a run folder (train.py's output_dir)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    setup_logging()
    model, processors = load_run(args.checkpoint, args.device)
    print(f"chatting with {args.checkpoint}; media: {', '.join(f'/{m} PATH' for m in processors)}; /reset; /quit")
    chat(ChatSession(model, processors, args.max_new_tokens), (print("you: ", end="", flush=True) or line
                                                              for line in sys.stdin), sys.stdout)


if __name__ == "__main__":
    main()
