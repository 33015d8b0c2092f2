import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def bash_blocks(text: str) -> list[str]:
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_readme_has_two_commands_and_ci_runs_the_test_one():
    blocks = bash_blocks((REPO / "README.md").read_text())
    assert len(blocks) == 2 and all("\n" not in block for block in blocks)
    main_job, tests = blocks
    assert "train.py --cfg-path configs/stage2_image.yaml" in main_job and "evaluate.py" in main_job
    assert "pytest" in tests
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


def test_readme_main_command_names_existing_configs():
    main_job = bash_blocks((REPO / "README.md").read_text())[0]
    for path in re.findall(r"--cfg-path (\S+)", main_job):
        assert (REPO / path).is_file(), path
