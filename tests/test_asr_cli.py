"""Bad inputs on the command line: one line naming the file (and line), exit status 2, no traceback
unless --debug. Audio is synthetic noise (no espeak-ng needed); the LLM is the tiny random one."""

from __future__ import annotations

import json

import pytest
import torch

from asr_reference.__main__ import main
from asr_reference.data import write_wav
from asr_reference.testing import SENTENCES

TINY = ["--enc-dim", "32", "--enc-layers", "1", "--warmup", "1", "--device", "cpu", "--batch-size", "2",
        "--save-every", "1"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from asr_reference.testing import make_tiny_lm

    root = tmp_path_factory.mktemp("cli")
    gen = torch.Generator().manual_seed(0)
    rows = []
    for i, text in enumerate(SENTENCES[:4]):
        write_wav(root / f"{i}.wav", 0.1 * torch.randn(16000, generator=gen))
        rows.append({"audio_filepath": f"{i}.wav", "text": text, "duration": 1.0})
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lm = make_tiny_lm(root / "lm")
    run = root / "run"
    main(["train", "--train", str(root / "train.jsonl"), "--llm", str(lm), "--run", str(run), "--steps", "3", *TINY])
    return {"root": root, "rows": rows, "lm": lm, "run": run, "manifest": root / "train.jsonl"}


def fails(argv, capsys, *needles):
    """Run the CLI, expect exit status 2 and a last stderr line containing every needle; returns it."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.mark.parametrize("change,message", [
    (lambda r: r.update(audio_filepath=12), "audio_filepath must be a non-empty path string, got 12"),
    (lambda r: r.update(audio_filepath=None), "audio_filepath must be a non-empty path string, got None"),
    (lambda r: r.update(duration="abc"), "duration must be a positive number of seconds, got 'abc'"),
    (lambda r: r.update(duration=None), "duration must be a positive number of seconds, got None"),
])
def test_bad_manifest_line(setup, tmp_path, capsys, change, message):
    rows = [dict(r, audio_filepath=str(setup["root"] / r["audio_filepath"])) for r in setup["rows"]]
    change(rows[2])
    m = tmp_path / "bad.jsonl"
    m.write_text("".join(json.dumps(r) + "\n" for r in rows))
    fails(["train", "--train", str(m), "--llm", str(setup["lm"]), "--run", str(tmp_path / "r"), *TINY],
          capsys, f"{m}:3: ", message)


def test_latin1_manifest_and_unreadable_audio(setup, tmp_path, capsys):
    m = tmp_path / "latin1.jsonl"
    good = json.dumps(dict(setup["rows"][0], audio_filepath=str(setup["root"] / "0.wav")))
    m.write_bytes(good.encode() + b"\n" + good.replace("the dog", "caf\\u00e9").encode().replace(b"\\u00e9", b"\xe9")
                  + b"\n")
    fails(["eval", "--run", str(setup["run"]), "--manifest", str(m), "--device", "cpu"], capsys,
          f"{m}:2: not UTF-8 (byte 0xe9")
    (tmp_path / "junk.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    m2 = tmp_path / "junk.jsonl"
    m2.write_text(json.dumps({"audio_filepath": "junk.wav", "text": "hello"}) + "\n")
    fails(["eval", "--run", str(setup["run"]), "--manifest", str(m2), "--device", "cpu"], capsys,
          f"{m2}:1: ", "junk.wav: cannot read audio")


def test_truncated_wav_names_file_and_line(setup, tmp_path, capsys):
    whole = (setup["root"] / "0.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(whole[: len(whole) // 3 + 1])  # ends mid-sample
    m = tmp_path / "cut.jsonl"
    m.write_text(json.dumps({"audio_filepath": "cut.wav", "text": "hello", "duration": 1.0}) + "\n")
    fails(["eval", "--run", str(setup["run"]), "--manifest", str(m), "--device", "cpu"], capsys,
          f"{m}:1: ", "cut.wav is 0.33 s long but the manifest says 1.00 s (truncated")


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "cannot read checkpoint, damaged or not a checkpoint"),
    (lambda b: b"garbage" + b, "cannot read checkpoint, damaged or not a checkpoint"),
    (None, "not a checkpoint of this program (no 'config')"),
])
def test_damaged_checkpoint_on_eval_and_resume(setup, tmp_path, capsys, damage, message):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    ckpt = run / "checkpoint.pt"
    if damage is None:
        torch.save({"model": {}}, ckpt)
    else:
        ckpt.write_bytes(damage(ckpt.read_bytes()))
    fails(["eval", "--run", str(run), "--manifest", str(setup["manifest"]), "--device", "cpu"], capsys,
          f"{ckpt}: ", message)
    fails(["train", "--train", str(setup["manifest"]), "--run", str(run), "--resume", "--device", "cpu"], capsys,
          f"{ckpt}: ", message)


@pytest.mark.parametrize("option,diff", [(["--vq", "hard"], "vq: 'soft' -> 'hard'"),
                                         (["--enc-dim", "64"], "enc_dim: 32 -> 64")])
def test_resume_refuses_a_changed_config(setup, capsys, option, diff):
    fails(["train", "--train", str(setup["manifest"]), "--run", str(setup["run"]), "--resume", "--device", "cpu",
           *option], capsys, str(setup["run"] / "checkpoint.pt"), "--resume with a different model config", diff)


def test_resume_with_more_steps_continues_a_finished_run(setup, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(setup["run"], run)
    argv = ["train", "--train", str(setup["manifest"]), "--run", str(run), "--resume", "--device", "cpu"]
    main(argv)  # same steps: nothing to do
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == 3
    main(argv + ["--steps", "5"])
    state = torch.load(run / "checkpoint.pt", weights_only=False)
    assert state["step"] == 5 and state["total_steps"] == 5 and state["requested_steps"] == 5


@pytest.mark.parametrize("option,message", [
    (["--save-every", "0"], "argument --save-every: must be >= 1, got 0"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--steps", "-1"], "argument --steps: must be >= 1, got -1"),
    (["--lr", "0"], "argument --lr: must be > 0.0, got 0"),
    (["--grad-accum", "x"], "argument --grad-accum: expected an integer, got 'x'"),
    (["--prompt", "no slot"], "argument --prompt: must contain {audio} exactly once"),
])
def test_argument_ranges_are_checked_at_parse_time(setup, tmp_path, capsys, option, message):
    line = fails(["train", "--train", "x.jsonl", "--llm", "lm", "--run", str(tmp_path / "r"), *option], capsys, message)
    assert capsys.readouterr().err == "" and line.startswith("python -m asr_reference train: error:")


def test_missing_folders_and_debug_traceback(setup, tmp_path, capsys):
    from asr_reference.errors import ManifestError

    fails(["train", "--train", str(setup["manifest"]), "--llm", str(tmp_path / "nope"), "--run", str(tmp_path / "r"),
           *TINY], capsys, f"{tmp_path / 'nope'}: LLM folder not found")
    fails(["train", "--train", str(setup["manifest"]), "--llm", str(setup["lm"]), "--run", str(tmp_path / "r2"),
           "--encoder", str(setup["lm"]), *TINY], capsys, f"{setup['lm']}: no preprocessor_config.json")
    fails(["eval", "--run", str(tmp_path / "none"), "--manifest", str(setup["manifest"])], capsys,
          f"{tmp_path / 'none'}: run folder not found")
    fails(["train", "--train", str(tmp_path / "no.jsonl"), "--llm", str(setup["lm"]), "--run", str(tmp_path / "r3")],
          capsys, f"{tmp_path / 'no.jsonl'}: manifest not found")
    with pytest.raises(ManifestError, match="manifest not found"):
        main(["train", "--train", str(tmp_path / "no.jsonl"), "--llm", str(setup["lm"]), "--run",
              str(tmp_path / "r3"), "--debug"])
