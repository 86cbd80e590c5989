"""Chat and streaming text through an ONNX export on the onnxruntime backend: the export carries
the checkpoint's tokenizer files, and chat() gives the reply the checkpoint itself gives."""

import pytest

import glmrt
from test_model_chat import chatglm3_ckpt, glm4_ckpt  # noqa: F401  (the fixtures: tiny checkpoints with tokenizers)

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("fixture", ["chatglm3_ckpt", "glm4_ckpt"])
def test_chat_through_an_onnx_export_equals_the_checkpoint(fixture, request, tmp_path):
    ckpt = request.getfixturevalue(fixture)
    out = glmrt.export_onnx(str(ckpt), tmp_path / "export", dtype="float32", progress=False)
    model = glmrt.load(str(out), backend="onnxruntime")
    reference = glmrt.load(str(ckpt), dtype="float32", kernels="reference", progress=False)
    assert model.chat_family == reference.chat_family and model.tokenizer is not None
    messages = [{"role": "user", "content": "你好, how are you?"}]
    reply = model.chat(messages, max_new_tokens=10)
    assert reply["token_ids"] == reference.chat(messages, max_new_tokens=10)["token_ids"]
    assert "".join(model.chat_stream(messages, max_new_tokens=10)) == model.tokenizer.decode(reply["token_ids"])
