"""The blend benchmark's teacher-forced agreement (kvserve/bench/blend.py): free-running outputs are used up to their
first wrong token, and every later position is asked again with the reference answer before it."""

import math
from types import SimpleNamespace

import pytest

from kvserve.bench.blend import teacher_forced


RIGHT, WRONG, REF = -0.1, -2.0, math.log(0.8)  # the scripted model's logprob of its token; the reference's


def _out(tokens, logprobs):
    lps = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(tokens, logprobs)]
    return SimpleNamespace(outputs=[SimpleNamespace(token_ids=list(tokens), logprobs=lps)])


class _Tokenizer:
    def encode_segments(self, segs):
        """["system", "q<i>"] -> the ids [0, 1000 + i]; the question segment starts at 1."""
        return [0, 1000 + int(segs[-1][1:])], [1]


class _ScriptedModel:
    """Given the reference answer so far, the next token is right except at `wrong` positions; once a free run has
    gone wrong it never comes back (it continues its own text), as a real model's run does."""

    def __init__(self, answers, wrong):
        self.answers, self.wrong, self.calls = answers, wrong, []
        self.engine = SimpleNamespace(tokenizer=_Tokenizer())

    def generate(self, prompts, params, use_tqdm=False):
        outs = []
        for prompt, sp in zip(prompts, params):
            question = prompt["prompt_segments"][-1]
            i = question[0] - 1000 if isinstance(question, list) else int(question[1:])
            k = len(question) - 1 if isinstance(question, list) else 0
            self.calls.append((i, k))
            toks, lps, gone = [], [], False
            for p in range(k, k + sp.max_tokens):
                ok = not gone and p not in self.wrong[i]
                toks.append(self.answers[i][p] if ok else 7)
                lps.append(RIGHT if ok else WRONG)
                gone = gone or not ok
            outs.append(_out(toks, lps))
        return outs


def test_teacher_forcing_asks_again_after_each_wrong_token(monkeypatch):
    import kvserve.bench.blend as blend

    n = 32
    answers = [[100 + p for p in range(n)], [200 + p for p in range(n)]]
    wrong = [{3, 4, 20}, set()]
    monkeypatch.setattr(blend, "segments", lambda docs, q: ["system", f"q{q}"])
    model = _ScriptedModel(answers, wrong)
    ref = [_out(a, [REF] * n) for a in answers]
    first = model.generate([{"prompt_segments": ["system", f"q{i}"]} for i in range(2)],
                           [SimpleNamespace(max_tokens=n)] * 2)
    model.calls.clear()
    eos = 999  # not in the answers: "answer only" covers all 32 positions
    tf = teacher_forced(model, None, [0, 1], ref, first, {}, eos)
    # question 0 goes wrong at 3 (asked again from 4), at 4 (again from 5), at 20 (again from 21); question 1 never
    assert model.calls == [(0, 4), (0, 5), (0, 21)]
    assert tf["requests"] == 2 + 3
    assert tf["all"]["positions"] == 2 * n
    assert tf["all"]["top1_agreement"] == (2 * n - 3) / (2 * n)  # the free run's garbage after 3 is not counted
    assert tf["per_question"] == [(n - 3) / n, 1.0]
    # the KL at each position against the reference's distribution there: 0.8 (log 0.8 - (-0.1)) where the token is
    # right; where it is wrong the reference token is missing from the model's top list and gets its floor (-2.0)
    right, wrong = 0.8 * (REF - RIGHT), 0.8 * (REF - WRONG)
    assert tf["all"]["kl_mean"] == pytest.approx(((2 * n - 3) * right + 3 * wrong) / (2 * n))
