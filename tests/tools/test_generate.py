import json


from infini_deploy.models import init_model, preset
from infini_deploy.models.tokenizer import decode, encode
from infini_deploy.runtime import Stream, TorchRunner
from helpers import invoke


def test_generate_streams_greedy_text_equal_to_the_api(tmp_path):
    prompt = "The grass is green. The sky is blue. " * 3          # 111 tokens: past one segment
    (tmp_path / "p.txt").write_text(prompt)
    res = invoke("generate", "tiny", "--prompt-file", tmp_path / "p.txt", "--max-new-tokens", 12,
                 "--seed", 3, "--no-progress")
    assert res.exit_code == 0, res.output
    model = init_model(preset("tiny"), seed=3)
    stream = Stream(TorchRunner(model), decode_runner=TorchRunner(model, graph="decode"))
    expected = decode(stream.generate(encode(prompt), 12, stop_tokens=[257])[0])
    assert res.stdout.startswith(expected) and res.stdout.strip() == expected.strip()
    assert "prompt 111 tokens" in res.stderr and "generated 12 tokens" in res.stderr


def test_generate_sampling_is_reproducible_with_a_seed():
    runs = [invoke("generate", "tiny", "--prompt", "Once upon a time", "--max-new-tokens", 30,
                   "--temperature", 1.0, "--top-p", 0.9, "--seed", seed, "--no-progress").stdout
            for seed in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_generate_errors_are_one_line():
    for args, message in [
        (["--prompt", "x", "--backend", "onnxruntime"], "--backend onnxruntime needs an export folder"),
        (["--prompt", ""], "the prompt has no tokens"),
        ([], "give exactly one of --prompt-file and --prompt"),
        (["--prompt", "x", "--top-k", 0], "Invalid value for '--top-k': 0 is not in the range x>=1"),
    ]:
        res = invoke("generate", "tiny", *args, "--no-progress")
        assert res.exit_code == 2, res.output
        assert message in res.output and "Traceback" not in res.output


def test_passkey_prints_the_table_and_writes_json(tmp_path):
    res = invoke("passkey", "tiny", "--lengths", "1k,2k", "--depths", "0,1", "--trials", 2, "--seed", 4,
                 "--json-out", tmp_path / "r.json", "--no-progress")
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[1].split() == ["length", "depth", "0", "depth", "1", "tokens/s", "peak", "RSS"]
    assert lines[2].split()[0] == "1K" and lines[3].split()[0] == "2K"
    report = json.loads((tmp_path / "r.json").read_text())
    trials = report["trials"]
    assert len(trials) == 2 * 2 * 2 and len({t["key"] for t in trials}) == 8
    assert all(t["prompt_tokens"] <= t["length"] for t in trials)
    assert all(t["correct"] == (t["generated"].strip()[:5] == str(t["key"])) for t in trials)
    assert [row["length"] for row in report["summary"]] == [1024, 2048]
    again = invoke("passkey", "tiny", "--lengths", "1k,2k", "--depths", "0,1", "--trials", 2, "--seed", 4,
                   "--json-out", tmp_path / "r2.json", "--no-progress")
    keys = lambda f: [t["key"] for t in json.loads((tmp_path / f).read_text())["trials"]]  # noqa: E731
    assert again.exit_code == 0 and keys("r.json") == keys("r2.json")


def test_passkey_bad_options_are_clear_errors():
    for args, message in [
        (["--depths", "0,2"], "expected numbers in [0, 1]"),
        (["--lengths", "lots"], "--lengths 'lots': expected a count"),
        (["--lengths", "100"], "too short for a passkey prompt"),
        (["--trials", 0], "Invalid value for '--trials': 0 is not in the range 1<=x<=100000"),
    ]:
        res = invoke("passkey", "tiny", *args, "--no-progress")
        assert res.exit_code == 2, res.output
        assert message in res.output


def test_generate_on_an_export_folder_in_onnxruntime_equals_torch(tiny_fp32):
    """The export is of the tiny preset, seed 0: both backends sample the same text with the same seed
    (an untrained model's greedy text is blank; tests/runtime/test_ort_runner_decode.py compares greedy tokens)."""
    prompt = "The grass is green. The sky is blue. " * 2          # 74 tokens: past one segment
    sampling = ("--prompt", prompt, "--max-new-tokens", 70, "--temperature", 1.0, "--seed", 0, "--no-progress")
    ort = invoke("generate", tiny_fp32, "--backend", "onnxruntime", "--threads", 1, *sampling)
    ref = invoke("generate", "tiny", *sampling)
    auto = invoke("generate", tiny_fp32, *sampling)
    assert ort.exit_code == ref.exit_code == auto.exit_code == 0, ort.output + ref.output
    assert ort.stdout == ref.stdout == auto.stdout and len(ort.stdout.strip()) > 0
    assert "prompt 74 tokens" in ort.stderr and "generated" in ort.stderr


def test_passkey_on_an_export_folder_in_onnxruntime_equals_torch(tiny_fp32, tmp_path):
    args = ("--lengths", "1k", "--depths", "0,1", "--trials", 1, "--seed", 0, "--no-progress")
    res = invoke("passkey", tiny_fp32, "--backend", "onnxruntime", *args, "--json-out", tmp_path / "o.json")
    ref = invoke("passkey", "tiny", *args, "--json-out", tmp_path / "t.json")
    assert res.exit_code == ref.exit_code == 0, res.output + ref.output
    assert "onnxruntime on cpu" in res.stdout
    got, want = (json.loads((tmp_path / f).read_text()) for f in ("o.json", "t.json"))
    assert got["backend"] == "onnxruntime" and want["backend"] == "torch"
    assert [(t["key"], t["generated"]) for t in got["trials"]] == [(t["key"], t["generated"]) for t in want["trials"]]
    assert all(len(t["generated"]) > 0 for t in got["trials"])


def test_generate_tensorrt_needs_engines_and_a_gpu(tiny_fp32):
    res = invoke("generate", "tiny", "--backend", "tensorrt", "--prompt", "x", "--no-progress")
    assert res.exit_code == 2 and "--backend tensorrt needs an export folder" in res.output
    res = invoke("generate", tiny_fp32, "--backend", "tensorrt", "--prompt", "x", "--no-progress")
    assert res.exit_code == 2 and "has no TensorRT engine for the 'segment' graph" in res.output


def test_passkey_under_bf16_autocast_names_its_runner_and_answers_like_float32(tmp_path):
    # bf16 autocast (the fast torch path on this CPU) for long evaluations; the state stays float32
    args = ["passkey", "tiny", "--lengths", "1k", "--depths", "0.5", "--trials", 2, "--seed", 4, "--no-progress"]
    res = invoke(*args, "--autocast", "bf16", "--json-out", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert "torch bf16 autocast on cpu" in res.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["runner"] == "torch bf16 autocast" and report["backend"] == "torch"
    plain = invoke(*args, "--json-out", tmp_path / "f.json")
    assert json.loads((tmp_path / "f.json").read_text())["runner"] == "torch"
    keys = lambda f: [t["key"] for t in json.loads((tmp_path / f).read_text())["trials"]]  # noqa: E731
    assert plain.exit_code == 0 and keys("b.json") == keys("f.json")


def test_passkey_batch_rows_give_the_results_of_one_by_one(tmp_path):
    """--batch streams several trials as batch rows: each row's key and answer are those it gets alone, and the
    last, partial batch keeps only the trials asked for."""
    from pathlib import Path

    from infini_deploy import export
    from infini_deploy.export.exporter import VALIDATION_TEXT
    from infini_deploy.models.checkpoint import PASSKEY_MODEL as BUNDLED

    text = Path(export.__file__).parent / "data" / VALIDATION_TEXT
    args = ["passkey", BUNDLED, "--lengths", "2k", "--depths", "0,1", "--trials", 5, "--seed", 2,
            "--haystack", text, "--no-progress"]
    one = invoke(*args, "--json-out", tmp_path / "one.json")
    three = invoke(*args, "--batch", 3, "--json-out", tmp_path / "three.json")
    assert one.exit_code == three.exit_code == 0, one.output + three.output
    got, want = (json.loads((tmp_path / f).read_text()) for f in ("three.json", "one.json"))
    fields = lambda r: [(t["depth"], t["trial"], t["key"], t["generated"], t["correct"]) for t in r["trials"]]  # noqa
    assert fields(got) == fields(want) and len(got["trials"]) == 2 * 5
    assert any(t["correct"] for t in got["trials"]) and got["batch"] == 3 and want["batch"] == 1
