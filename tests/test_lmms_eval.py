"""zipchat as an lmms-eval model (issue 35, item 5), in lmms-eval's own environment (CI's optional stage:
requirements-eval.txt; skipped where lmms-eval is not installed). lmms-eval's command line runs two local task
YAMLs over a dataset the test writes (never a download): a generate_until task scored as POPE scores, and a
multiple-choice task scored by log-likelihood (lmms-eval ranks its choices by loss). Its logged answers equal a zipchat session's own answers to the
same images and prompts, its log-likelihoods equal a brute-force token-by-token computation, and its reported
accuracy equals a recount of its logged samples (float32, tiny twins)."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pipeline import ChatSession, load_vlm
from tests.conftest import ROOT
from tests.test_agreement import brute_force_logprobs

pytest.importorskip("lmms_eval")

MODEL_ARGS = "model=tiny-llava,method=visionzip,dominant=54,contextual=10,dtype=float32"
POST = "\nAnswer the question using a single word or phrase."
ROWS = [  # (colour, question, answer)
    ((200, 30, 30), "Is the picture red?", "yes"),
    ((30, 200, 30), "Is the picture blue?", "no"),
    ((30, 30, 200), "Is there a dog?", "no"),
]

UTILS = '''
from PIL import Image

POST = {post!r}


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"] + POST


def process_results(doc, results):
    return {{"exact": float(results[0].strip().lower() == doc["answer"])}}
'''

GENERATE_YAML = """task: zipchat_local_yesno
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  until: ["{until}"]
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""

CHOICE_YAML = """task: zipchat_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["yes", "no"]
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  - version: 0.0
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """lmms-eval's command line over the two tasks -> (the dataset rows, {task: (results, samples)})."""
    tmp = tmp_path_factory.mktemp("lmms")
    rows = []
    for i, (colour, question, answer) in enumerate(ROWS):
        path = tmp / f"{i}.png"
        Image.new("RGB", (96 + 40 * i, 80), colour).save(path)
        rows.append({"image": str(path), "question": question, "answer": answer})
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = tmp / "tasks"
    tasks.mkdir()
    (tasks / "utils.py").write_text(UTILS.format(post=POST))
    (tasks / "yesno.yaml").write_text(GENERATE_YAML.format(data=data, until="."))
    (tasks / "choice.yaml").write_text(CHOICE_YAML.format(data=data))
    out = tmp / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               WANDB_MODE="disabled", HF_HOME=str(tmp / "hf"), HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="127.0.0.1,localhost", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "pipeline.lmms_model", "--model", "zipchat", "--model_args", MODEL_ARGS,
           "--tasks", "zipchat_local_yesno,zipchat_local_choice", "--include_path", str(tasks),
           "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    results = [json.loads(p.read_text()) for p in out.rglob("*_results.json")]
    assert len(results) == 1, done.stdout[-3000:] + done.stderr[-6000:]  # (lmms-eval exits 0 after an error)
    found = {}
    for task in ("zipchat_local_yesno", "zipchat_local_choice"):
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        samples = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda s: s["doc_id"])
        found[task] = (results[0]["results"][task], samples)
    return rows, found


@pytest.fixture(scope="module")
def vlm():
    return load_vlm("tiny-llava", dtype="float32")


def session_for(vlm, row, tokens=6):
    s = ChatSession(vlm, method="full", max_new_tokens=tokens)
    s.add_images([Image.open(row["image"]).convert("RGB")])
    s.set_method("visionzip", dominant=54, contextual=10)
    return s


def test_generate_until_answers_as_zipchat_does(run, vlm):
    rows, found = run
    metrics, samples = found["zipchat_local_yesno"]
    assert [s["doc_id"] for s in samples] == [0, 1, 2]
    for row, sample in zip(rows, samples):
        own = session_for(vlm, row).ask(row["question"] + POST).split(".", 1)[0]  # the task's `until`
        assert sample.get("resps", own) == own and sample["filtered_resps"] == own.strip(), row  # (its filter strips)
        assert sample["exact"] == float(own.strip().lower() == row["answer"])
    recount = sum(s["exact"] for s in samples) / len(samples)
    assert metrics["exact,none"] == pytest.approx(recount)


def test_loglikelihood_equals_brute_force(run, vlm):
    from pipeline.compare import private_session
    from pipeline.state import Turn
    rows, found = run
    metrics, samples = found["zipchat_local_choice"]
    right = 0
    for row, sample in zip(rows, samples):
        question = row["question"] + POST
        s = session_for(vlm, row, tokens=1)
        s.ask(question)
        other = private_session(s, "visionzip", None)
        other.prepare_turn(question)
        plan = other.plan(Turn(question=question, images=list(other.state.pending)))
        prompt = plan.ids, plan.slots, other.request(plan).features
        want = []
        for choice in ("yes", "no"):
            ids = vlm.tokenizer(choice, add_special_tokens=False)["input_ids"]
            lps = brute_force_logprobs(vlm, *prompt, ids)
            want.append(-sum(lps) / len(lps))  # the mean loss, as lmms-eval's own models return it
        got = [float(r[0]) for r in sample["filtered_resps"]]  # [(loss, is greedy)] per choice
        assert got == pytest.approx(want, abs=5e-4), row
        right += int(min(range(2), key=lambda i: want[i]) == ["yes", "no"].index(row["answer"]))
    assert metrics["acc,none"] == pytest.approx(right / len(rows))
