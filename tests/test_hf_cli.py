"""`megaspec convert` in a subprocess: HF directory -> megaspec checkpoint -> HF directory."""

import subprocess
import sys

import pytest
import torch
from hf_cases import VOCAB, assert_lm_parity, batch

import megaspec

transformers = pytest.importorskip("transformers")


def megaspec_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megaspec", *args], capture_output=True, text=True, timeout=300)


def test_convert_both_ways(tmp_path) -> None:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(tmp_path / "hf")

    done = megaspec_cli("convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"wrote {tmp_path / 'ckpt'}"
    assert_lm_parity(megaspec.load(tmp_path / "ckpt").eval(), hf)

    done = megaspec_cli("convert", "--to", "hf", str(tmp_path / "ckpt"), str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    input_ids, _ = batch()
    with torch.no_grad():
        assert torch.equal(back(input_ids).logits, hf(input_ids).logits)


def test_convert_reports_errors_cleanly(tmp_path, capsys) -> None:
    from megaspec.cli import main

    assert main(["convert", "--to", "hf", str(tmp_path), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: '{tmp_path}' is not a megaspec checkpoint (no megaspec.yaml)"
    assert main(["convert", str(tmp_path), str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.strip() == f"error: '{tmp_path}' is not an HF model directory (no config.json)"
