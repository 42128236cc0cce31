"""``kvloom chat`` ends cleanly on Ctrl-C: at the prompt it exits, during a reply it stops
the reply (freeing its KV blocks) and returns to the prompt."""

from __future__ import annotations

import builtins

from kvloom.engine.engine import Engine
from kvloom.entrypoints import cli


def typed(monkeypatch, *lines):
    """Make input() return ``lines`` in turn; an exception class among them is raised."""
    queue = list(lines)

    def fake_input(prompt=""):
        item = queue.pop(0)
        if isinstance(item, type) and issubclass(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    return queue


def chat(tiny_qwen2) -> int:
    return cli.main(["chat", "--model", str(tiny_qwen2), "--dtype", "float32",
                     "--max-tokens", "16"])


def test_ctrl_c_at_the_prompt_exits_cleanly(tiny_qwen2, monkeypatch, capsys):
    typed(monkeypatch, KeyboardInterrupt)
    assert chat(tiny_qwen2) == 0
    assert "Traceback" not in capsys.readouterr().err


def test_ctrl_c_during_a_reply_stops_it_and_the_chat_goes_on(tiny_qwen2, monkeypatch,
                                                             capsys):
    engines = []
    original_step = Engine.step

    def step_then_interrupt(self):
        engines.append(self)
        if len(engines) == 3:  # two steps of the first reply, then Ctrl-C
            raise KeyboardInterrupt
        return original_step(self)

    monkeypatch.setattr(Engine, "step", step_then_interrupt)
    remaining = typed(monkeypatch, "Hello", "Again", "")
    assert chat(tiny_qwen2) == 0
    assert remaining == []  # the second message was read and answered after the interrupt
    captured = capsys.readouterr()
    assert "[interrupted]" in captured.err and "Traceback" not in captured.err
    engine = engines[0]
    assert not engine.has_unfinished_requests()
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
