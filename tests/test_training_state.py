"""The training state: a restart continues the run that wrote it, or says what differs and what to do."""
import random
import re
import shutil

import numpy as np
import pytest
import torch
from test_distill import NETWORK, SignalledAt, fake_fid, make_toy, settings, stop_signals  # noqa: F401 (fixture)

from sidcore import checkpoint, run_record, training_state
from sidcore.distill import Distiller
from sidcore.distributed import Context
from sidcore.errors import UserError
from sidcore.settings import Engine


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return make_toy(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="module")
def finished(files, tmp_path_factory):
    """The directory of a finished SiD run."""
    out = tmp_path_factory.mktemp("run")
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)
    return out


def test_changes_are_named_by_dotted_path_with_old_and_new_value():
    old = {"alpha": 1.0, "init": None, "distill": {"lr": 1e-4, "seed": 3, "stage_kimg": [1, 2]}}
    new = {"alpha": 1.2, "init": None, "distill": {"lr": 2e-4, "seed": 3, "stage_kimg": [1, 3], "bf16": True}}
    assert run_record.changes(old, new) == ["alpha 1.0 -> 1.2", "distill.bf16 (unset) -> true",
                                                "distill.lr 0.0001 -> 0.0002", "distill.stage_kimg [1, 2] -> [1, 3]"]
    assert run_record.changes(new, new) == []


def test_resume_with_changed_settings_names_each_change(files, finished):
    changed = settings("sid", glr=3e-4, bf16=False)  # bf16's default: no change
    changed["alpha"] = 1.0
    with pytest.raises(UserError) as e:
        Distiller(changed, files / "teacher.pt", files / "data.zip", finished)
    assert str(e.value) == (f"{finished / 'training-state.pt'}: the run was started with other settings: "
                            "alpha 1.2 -> 1.0, distill.glr 0.0001 -> 0.0003; restore them, or start it over with "
                            "the earlier run kept aside (config on_changed_settings: start-over)")


def test_a_run_resumes_with_other_execution_levers(files, finished):
    levers = settings("sid", engine=Engine(channels_last=True, fused_attention=True, fused_adam=True))
    dist = Distiller(levers, files / "teacher.pt", files / "data.zip", finished)
    assert dist.cur_nimg == levers["distill"].duration_kimg * 1000  # resumed, at the end


def test_resume_with_another_number_of_processes_is_refused(finished):
    path = finished / "training-state.pt"
    with pytest.raises(UserError) as e:
        training_state.read(path, 2, settings("sid"))
    assert str(e.value) == (f"{path}: the run was started with 1 processes and is resumed with 2; resume it with 1 "
                            "(each process has its own random streams) or delete the run directory to start over")
    assert training_state.read(path, 1, settings("sid"))["cur_nimg"] == 160


def test_an_unreadable_training_state_names_the_file_and_how_to_restart(files, tmp_path):
    path = tmp_path / "training-state.pt"
    path.write_bytes(b"")
    with pytest.raises(UserError) as e:
        Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path)
    assert str(e.value) == (f"{path}: not a readable sidcore checkpoint (an empty file); "
                            "delete it to restart the run from its beginning")
    checkpoint.save_atomic(checkpoint.network_snapshot(torch.nn.Linear(1, 1), NETWORK), path)
    with pytest.raises(UserError, match=re.escape(f"{path}: not a training state of this sidcore version; delete it")):
        Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path)
    path.unlink()
    assert Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", tmp_path).cur_nimg == 0


def test_random_states_are_restored():
    device = torch.device("cpu")
    state = training_state.rng_state(device)
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    training_state.set_rng_state(state, device)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws


def record_span(path, name: str) -> tuple[int, int]:
    """Byte range of the stored (uncompressed) zip member ``name`` inside a torch.save file."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = z.getinfo(name)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    start = info.header_offset + 30 + name_len + extra_len
    return start, start + info.file_size


def tensor_records(path) -> list[str]:
    import zipfile
    with zipfile.ZipFile(path) as z:
        return [i.filename for i in z.infolist() if "/data/" in i.filename]


def flipped(data: bytes, at: int, n: int) -> bytes:
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + n]) + data[at + n:]


@pytest.mark.parametrize("damage", ["64 bytes in the middle", "8 bytes in a tensor record", "cur_nimg edited",
                                    "a directory"])
def test_a_damaged_training_state_is_refused_naming_the_file_and_nothing_is_deleted(finished, tmp_path, damage):
    path = tmp_path / "training-state.pt"
    good = (finished / "training-state.pt").read_bytes()
    path.write_bytes(good)
    assert training_state.read(path, 1, settings("sid"))["cur_nimg"] == 160  # the copy itself is accepted
    if damage == "64 bytes in the middle":
        middle = len(good) // 2  # tensor data, which torch.load never checks
        spans = [record_span(path, record) for record in tensor_records(path)]
        assert any(start <= middle < end - 64 for start, end in spans)
        path.write_bytes(flipped(good, middle, 64))
    elif damage == "8 bytes in a tensor record":
        start, end = record_span(path, tensor_records(path)[-1])
        path.write_bytes(flipped(good, end - 8, 8))
    elif damage == "cur_nimg edited":
        state = torch.load(path, weights_only=True)
        torch.save({**state, "cur_nimg": state["cur_nimg"] + 32}, path)
    else:
        path.unlink()
        path.mkdir()
    damaged = path.read_bytes() if path.is_file() else None
    with pytest.raises(UserError) as e:
        training_state.load(tmp_path, Context(0, 1, 0, torch.device("cpu")), settings("sid"))
    said = "a directory where" if damage == "a directory" else "its content is not what was written"
    assert str(e.value).startswith(f"{path}: {said}") and "delete it to restart" in str(e.value), str(e.value)
    assert (path.read_bytes() if path.is_file() else None) == damaged and path.exists()


def test_a_state_written_before_digests_resumes_with_a_note(finished, tmp_path, capsys):
    path = tmp_path / "training-state.pt"
    state = torch.load(finished / "training-state.pt", weights_only=True)
    del state["digest"]
    torch.save(state, path)
    assert training_state.read(path, 1, settings("sid"))["cur_nimg"] == 160
    assert "a state without a digest (written by an earlier sidcore); resumed unchecked" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------
# What a job does with the run already in its folder (sidcore.run_record): continue it, or start it over with
# the earlier run kept aside; never delete it.

CPU = Context(0, 1, 0, torch.device("cpu"))


def tree(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published_once(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("published") / "alpha1.2"
    inputs = {"teacher": files / "teacher.pt", "init": None}
    training_state.begin(out, CPU, settings("sid"), inputs, start="plan-1", log=lambda m: None)
    Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).run(fake_fid, log=lambda m: None)
    return out, inputs


@pytest.fixture
def published(published_once, tmp_path):
    """A finished SiD run started by the plan ``plan-1``, with its generator and record (a copy of one run)."""
    run, inputs = published_once
    shutil.copytree(run, tmp_path / run.name)
    return tmp_path / run.name, inputs


def begin(out, inputs, start=None, on_change="stop", **distill) -> list[str]:
    said = []
    training_state.begin(out, CPU, settings("sid", **distill), inputs, start=start, on_change=on_change,
                         log=said.append)
    return said


def test_a_run_is_recorded_with_its_settings_inputs_and_plan(files, published):
    out, _ = published
    record = run_record.read(out)
    assert record["start"] == "plan-1" and record["inputs"] == {"teacher": run_record_digest(files / "teacher.pt")}
    assert record["settings"] == run_record.training_settings(settings("sid"))
    assert run_record.settings_changes(out, settings("sid")) == []
    assert run_record.settings_changes(out, settings("sid", glr=2e-4)) == ["distill.glr 0.0001 -> 0.0002"]


def run_record_digest(path) -> str:
    import hashlib
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("case", ["requeue of the same plan", "rerun without force"])
def test_a_job_that_is_not_a_new_force_continues_the_run(files, published, case):
    out, inputs = published
    before = tree(out)
    said = begin(out, inputs, start="plan-1" if case == "requeue of the same plan" else None)
    assert said == [] and tree(out) == before and not list(out.parent.glob("*.kept-*"))
    assert Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).cur_nimg == 160


def kept(out) -> list:
    return sorted(out.parent.glob(f"{out.name}.kept-*"))


@pytest.mark.usefixtures("stop_signals")
def test_a_forced_rerun_keeps_the_run_aside_trains_from_image_0_and_its_requeue_continues(files, published):
    out, inputs = published
    before = tree(out)
    said = begin(out, inputs, start="plan-2")
    [aside] = kept(out)
    assert re.fullmatch(r"alpha1\.2\.kept-\d{8}T\d{6}Z-forced", aside.name), aside.name
    assert said == [f"starting {out} over (forced): the earlier run is kept as {aside}"]
    assert tree(aside) == before  # every file, byte for byte: the generator, state, log and record
    assert sorted(tree(out)) == ["settings.json"] and run_record.read(out)["start"] == "plan-2"
    dist = Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out)
    assert dist.cur_nimg == 0
    stopped = SignalledAt(64, settings("sid"), files / "teacher.pt", files / "data.zip", out)  # then requeued
    assert stopped.run(fake_fid, log=lambda m: None) is False
    assert begin(out, inputs, start="plan-2") == [] and kept(out) == [aside]  # the requeued job, same plan
    assert Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).cur_nimg == 64


def test_changed_settings_stop_by_default_naming_each_change_and_keep_everything(files, published):
    out, inputs = published
    before = tree(out)
    with pytest.raises(UserError) as e:
        begin(out, inputs, glr=2e-4, bf16=True)
    assert str(e.value) == (f"{out}: the run was started with other settings: distill.bf16 false -> true, "
                            "distill.glr 0.0001 -> 0.0002; restore them, or start it over with the earlier run kept "
                            "aside (config on_changed_settings: start-over)")
    assert tree(out) == before and kept(out) == []


def test_changed_settings_start_over_when_chosen_kept_aside_under_their_old_values(files, published):
    out, inputs = published
    before = tree(out)
    said = begin(out, inputs, on_change="start-over", glr=2e-4)
    [aside] = kept(out)
    assert aside.name.endswith("-glr=0.0001") and tree(aside) == before and said
    assert run_record.read(out)["settings"] == run_record.training_settings(settings("sid", glr=2e-4))
    assert Distiller(settings("sid", glr=2e-4), files / "teacher.pt", files / "data.zip", out).cur_nimg == 0


def test_a_remade_teacher_starts_the_run_over(files, published, tmp_path):
    out, inputs = published
    other = tmp_path / "teacher-2.pt"
    other.write_bytes((files / "teacher.pt").read_bytes() + b"\0")  # any other content
    begin(out, {"teacher": other, "init": None})
    [aside] = kept(out)
    assert aside.name.endswith("-teacher-changed")


def test_a_generator_without_its_state_is_kept_aside_before_a_new_start(files, published):
    out, inputs = published
    (out / "training-state.pt").unlink()
    generator = (out / "generator.pt").read_bytes()
    begin(out, inputs)
    [aside] = kept(out)
    assert aside.name.endswith("-no-state") and (aside / "generator.pt").read_bytes() == generator


def test_a_state_of_an_earlier_sidcore_without_a_record_continues_and_gets_one(files, published):
    out, inputs = published
    (out / "settings.json").unlink()
    assert begin(out, inputs) == [] and kept(out) == [] and run_record.read(out)["start"] is None
    assert Distiller(settings("sid"), files / "teacher.pt", files / "data.zip", out).cur_nimg == 160


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"settings": {}}'])
def test_a_damaged_run_record_is_refused_naming_it_and_nothing_moves(files, published, text):
    out, inputs = published
    (out / "settings.json").write_text(text)
    before = tree(out)
    with pytest.raises(UserError, match=re.escape(f"{out / 'settings.json'}: not a")):
        begin(out, inputs, start="plan-3")
    assert tree(out) == before and kept(out) == []
