"""Every chart the report shows has a title and labelled axes (the y axis with its unit)."""
from __future__ import annotations

import pytest


@pytest.fixture
def saved_axes(monkeypatch):
    """The Axes of every figure saved while the test runs (Figure.savefig still writes the file)."""
    from matplotlib.figure import Figure

    axes = []
    real = Figure.savefig

    def record(self, *a, **kw):
        axes.extend(self.axes)
        return real(self, *a, **kw)

    monkeypatch.setattr(Figure, "savefig", record)
    return axes


def _labelled(ax, y_unit: str) -> None:
    assert ax.get_title().strip()
    assert ax.get_xlabel().strip()
    assert y_unit in ax.get_ylabel()


def test_bpc_chart(saved_axes, tmp_path):
    from evaluation.bpc import write_chart

    write_chart([{"model": "base", "bits_per_char": 9.1}, {"model": "sft-merged", "bits_per_char": 7.4}],
                tmp_path / "bpc.png")
    assert (tmp_path / "bpc.png").read_bytes()[:4] == b"\x89PNG"
    (ax,) = saved_axes
    _labelled(ax, "bits per character")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "sft-merged"]


def test_vocab_chart(saved_axes, tmp_path):
    from vocab.report import write_chart

    rows = {"base": {"tokens_per_1000_chars": 1210.0, "characters": 5000},
            "extended": {"tokens_per_1000_chars": 640.0, "characters": 5000}}
    write_chart({"tokenizers": rows, "lines": 100}, tmp_path / "vocab.png")
    (ax,) = saved_axes
    _labelled(ax, "tokens per 1,000 characters")


def test_training_loss_chart(saved_axes, tmp_path):
    from zhllama.trainer import plot_loss

    out = tmp_path / "pretrain" / "phase2"
    out.mkdir(parents=True)
    plot_loss([{"step": 5, "loss": 8.1}, {"step": 10, "loss": 7.6}, {"step": 10, "eval_loss": 7.9}], out / "loss.png")
    (ax,) = saved_axes
    _labelled(ax, "nats per token")
    assert "pretrain/phase2" in ax.get_title()
