"""The VLM forward contract: splice, span errors, loss, gradients, packing, generation."""

import copy

import pytest
import torch

from models.tokens import image_token_ids


def image_span(tok, n):
    ids = image_token_ids(tok)
    return [ids.start] + [ids.pad] * n + [ids.end]


def text(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def images(n, size=84, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def batch(tiny_tokenizer, tiny_vlm):
    """Row 0: two images; row 1: one image. Equal lengths, no padding."""
    tok, n = tiny_tokenizer, tiny_vlm.config.num_image_tokens
    row0 = (
        text(tok, "Picture 1:")
        + image_span(tok, n)
        + text(tok, "Picture 2:")
        + image_span(tok, n)
        + text(tok, " two dogs")
    )
    row1 = image_span(tok, n) + text(tok, "Describe the image in English: a red car")
    row1 = row1 + text(tok, " parked near the water")[: len(row0) - len(row1)]
    row1 += [tok.pad_token_id] * (len(row0) - len(row1))
    assert len(row0) == len(row1)
    return torch.tensor([row0, row1]), images(3)


def test_image_features_land_in_the_imgpad_slots_in_order_and_text_is_untouched(tiny_vlm, batch):
    input_ids, pixel_values = batch
    with torch.no_grad():
        embeds = tiny_vlm.embed(input_ids, pixel_values)
        features = tiny_vlm.encode_images(pixel_values)  # [3, N, d]
        table = tiny_vlm.llm.get_input_embeddings().weight
    slots = input_ids == tiny_vlm.config.image_pad_id
    assert torch.equal(embeds[slots], features.reshape(-1, features.shape[-1]))  # row-major = image order
    assert torch.equal(
        embeds[~slots], table[input_ids[~slots]]
    )  # <img>, </img> and text keep their embeddings
    # row 0 holds images 0 and 1, row 1 holds image 2
    n = tiny_vlm.config.num_image_tokens
    assert torch.equal(embeds[1][slots[1]], features[2])
    assert torch.equal(embeds[0][slots[0]][:n], features[0])


@pytest.mark.parametrize(
    "case, match",
    [
        ("too_few_images", "batch row 1"),
        ("too_many_images", "batch row 1 .last."),
        ("short_span_in_row_0", "batch row 0"),
    ],
)
def test_span_image_mismatch_is_a_value_error_naming_the_row(tiny_vlm, batch, case, match):
    input_ids, pixel_values = batch
    if case == "too_few_images":
        pixel_values = pixel_values[:2]
    elif case == "too_many_images":
        pixel_values = images(4)
    else:
        input_ids = input_ids.clone()
        input_ids[0, (input_ids[0] == tiny_vlm.config.image_pad_id).nonzero()[0]] = 5
    with pytest.raises(ValueError, match=match):
        tiny_vlm(input_ids, pixel_values=pixel_values)


def test_image_spans_without_pixel_values_are_an_error(tiny_vlm, batch):
    with pytest.raises(ValueError, match="batch row 0"):
        tiny_vlm(batch[0])


def test_loss_is_the_token_sum_of_hf_cross_entropy(tiny_vlm, batch):
    input_ids, pixel_values = batch
    labels = input_ids.clone()
    labels[input_ids == tiny_vlm.config.image_pad_id] = -100
    labels[1, -5:] = -100
    with torch.no_grad():
        out = tiny_vlm(input_ids, pixel_values=pixel_values, labels=labels)
        hf = tiny_vlm.llm(inputs_embeds=tiny_vlm.embed(input_ids, pixel_values), labels=labels)
    expected_tokens = (labels[:, 1:] != -100).sum()
    assert out.num_tokens == expected_tokens and out.logits is None
    assert out.loss_sum.dtype == torch.float32
    torch.testing.assert_close(out.loss, hf.loss)
    torch.testing.assert_close(out.loss_sum, hf.loss * expected_tokens)


def test_logits_without_labels(tiny_vlm, batch):
    input_ids, pixel_values = batch
    with torch.no_grad():
        out = tiny_vlm(input_ids, pixel_values=pixel_values)
    assert out.logits.shape == (*input_ids.shape, tiny_vlm.config.text_config["vocab_size"])
    assert out.loss is None


def test_gradients_reach_every_parameter_with_images(tiny_vlm, batch):
    model = copy.deepcopy(tiny_vlm).train()
    input_ids, pixel_values = batch
    model(input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
    for part in (model.vision, model.resampler):
        assert all(p.grad.abs().sum() > 0 for p in part.parameters())


def test_shared_images_encoded_once_give_the_loss_and_gradients_of_each_span_its_own_copy(tiny_vlm, batch):
    """image_index (a preference pair's two sequences show the same images): the spans [0, 1 | 0] over two
    images equal three images [a, b, a] in loss and in every gradient, vision tower and resampler included."""
    input_ids, _ = batch
    shared = images(2, seed=3)
    runs = []
    for pixel_values, index in ((shared[[0, 1, 0]], None), (shared, torch.tensor([0, 1, 0]))):
        model = copy.deepcopy(tiny_vlm).train()
        loss = model(input_ids, pixel_values=pixel_values, labels=input_ids, image_index=index).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_copies, grads_copies), (loss_once, grads_once) = runs
    torch.testing.assert_close(loss_once, loss_copies)
    for name, grad in grads_copies.items():
        torch.testing.assert_close(grads_once[name], grad, msg=name)
    with pytest.raises(
        ValueError, match="batch row 1: image spans up to this row need 3"
    ):  # checked against the index
        tiny_vlm(input_ids, pixel_values=shared, labels=input_ids, image_index=torch.tensor([0, 1]))


def test_frozen_towers_encode_a_pixel_tensor_once_inside_frozen_vision_shared(tiny_vlm, batch):
    """DPO's reference and policy forwards (one model, or a frozen copy of it) see the same pixel tensor: its
    frozen tower runs once between them, with the outputs it would give alone. A tower that trains runs each
    time, and outside the block nothing is shared."""
    from models.vlm import frozen_vision_shared

    input_ids, pixel_values = batch
    policy = copy.deepcopy(tiny_vlm).train()
    policy.vision.requires_grad_(False)
    reference = copy.deepcopy(policy).eval()
    runs = []
    for model in (policy, reference):
        model.vision.register_forward_hook(lambda module, args, out: runs.append(module))
    alone = [
        model(input_ids, pixel_values=pixel_values, labels=input_ids).loss_sum
        for model in (reference, policy)
    ]
    assert len(runs) == 2
    runs.clear()
    with frozen_vision_shared(policy, reference):
        with torch.no_grad():
            shared_reference = reference(input_ids, pixel_values=pixel_values, labels=input_ids).loss_sum
        shared_policy = policy(input_ids, pixel_values=pixel_values, labels=input_ids).loss_sum
        policy(input_ids, pixel_values=pixel_values.clone(), labels=input_ids)  # another tensor: encoded anew
    assert runs == [reference.vision, policy.vision]
    assert torch.equal(shared_reference, alone[0]) and torch.equal(shared_policy.detach(), alone[1].detach())
    shared_policy.backward()  # the resampler still trains on the shared encoding
    assert all(p.grad is not None for p in policy.resampler.parameters())
    assert policy.shared_vision is None and reference.shared_vision is None

    policy.vision.requires_grad_(True)  # a training tower is never shared
    runs.clear()
    with frozen_vision_shared(policy):
        for _ in range(2):
            policy(input_ids, pixel_values=pixel_values, labels=input_ids)
    assert runs == [policy.vision, policy.vision]


def test_text_only_training_batch_gives_zero_grads_to_vision_and_resampler(tiny_vlm, tiny_tokenizer):
    model = copy.deepcopy(tiny_vlm).train()
    ids = torch.tensor([text(tiny_tokenizer, "What color is the bus? The bus is yellow.")])
    for pv in (None, torch.zeros(0, 3, 84, 84)):
        model.zero_grad(set_to_none=True)
        out = model(ids, pixel_values=pv, labels=ids)
        out.loss.backward()
        for name, p in [*model.vision.named_parameters(), *model.resampler.named_parameters()]:
            assert p.grad is not None, f"{name} got no gradient"
            assert torch.count_nonzero(p.grad) == 0, name
        assert model.llm.get_input_embeddings().weight.grad.abs().sum() > 0
    with torch.no_grad():  # the dummy image does not change the loss
        torch.testing.assert_close(tiny_vlm(ids, labels=ids).loss, out.loss.detach())


def test_text_only_eval_does_not_run_the_vision_tower(tiny_vlm, tiny_tokenizer):
    calls = []
    handle = tiny_vlm.vision.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad():
            tiny_vlm(torch.tensor([text(tiny_tokenizer, "a cat")]))
    finally:
        handle.remove()
    assert calls == []


def test_packed_row_loss_equals_the_sum_of_separate_losses(tiny_vlm, tiny_tokenizer):
    """Two samples (one with an image) + tail padding packed in one row, attention_mask=None and
    position ids restarting at 0: the same loss and logits as running each sample alone."""
    tok, n = tiny_tokenizer, tiny_vlm.config.num_image_tokens
    a = image_span(tok, n) + text(tok, "A photo of a dog running on the beach")
    b = text(tok, "Question: What is the boy eating? Answer: an apple.")
    pad = [tok.pad_token_id] * 3

    def labels_for(ids):
        lab = torch.tensor(ids)
        lab[lab == tiny_vlm.config.image_pad_id] = -100
        lab[0] = -100  # first token of every sample is never a target
        return lab

    packed_ids = torch.tensor([a + b + pad])
    packed_labels = torch.cat([labels_for(a), labels_for(b), torch.full((3,), -100)])[None]
    position_ids = torch.cat([torch.arange(len(a)), torch.arange(len(b)), torch.arange(3)])[None]
    px = images(1)
    with torch.no_grad():
        packed = tiny_vlm(packed_ids, pixel_values=px, position_ids=position_ids, labels=packed_labels)
        packed_logits = tiny_vlm(packed_ids, pixel_values=px, position_ids=position_ids).logits
        sep_a = tiny_vlm(torch.tensor([a]), pixel_values=px, labels=labels_for(a)[None])
        sep_b = tiny_vlm(torch.tensor([b]), labels=labels_for(b)[None])
        logits_b = tiny_vlm(torch.tensor([b])).logits
    assert packed.num_tokens == sep_a.num_tokens + sep_b.num_tokens
    torch.testing.assert_close(packed.loss_sum, sep_a.loss_sum + sep_b.loss_sum)
    torch.testing.assert_close(packed_logits[0, len(a) : len(a) + len(b)], logits_b[0])


def test_packing_matters_without_restarting_positions(tiny_vlm, tiny_tokenizer):
    """Guard for the test above: with plain positions the second sample sees the first."""
    tok = tiny_tokenizer
    a, b = text(tok, "A red car is parked."), text(tok, "The cat sleeps on a table.")
    with torch.no_grad():
        joint = tiny_vlm(torch.tensor([a + b])).logits[0, len(a) :]
        alone = tiny_vlm(torch.tensor([b])).logits[0]
    assert not torch.allclose(joint, alone, atol=1e-4)


def test_left_padded_batch_matches_unpadded_rows(tiny_vlm, tiny_tokenizer):
    tok = tiny_tokenizer
    short, long = text(tok, "a cat"), text(tok, "two people are sitting on a bench")
    pad = len(long) - len(short)
    ids = torch.tensor([[tok.pad_token_id] * pad + short, long])
    mask = torch.tensor([[0] * pad + [1] * len(short), [1] * len(long)])
    with torch.no_grad():
        padded = tiny_vlm(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
        alone = tiny_vlm(torch.tensor([short])).logits
    torch.testing.assert_close(padded[0, pad:], alone[0], atol=1e-5, rtol=1e-5)


def test_generate_returns_only_new_tokens_equal_to_greedy_decoding(tiny_vlm, tiny_tokenizer):
    tok, n = tiny_tokenizer, tiny_vlm.config.num_image_tokens
    prompts = [
        image_span(tok, n) + text(tok, "Describe the image in English:"),
        image_span(tok, n) + text(tok, "Is"),
    ]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    px = images(2)
    with torch.no_grad():
        new = tiny_vlm.generate(ids, attention_mask=mask, pixel_values=px, max_new_tokens=4, do_sample=False,
                                eos_token_id=None)  # fmt: skip
    assert new.shape == (2, 4)
    # Independent greedy decoding with full forwards of each unpadded prompt.
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(4):
            with torch.no_grad():
                logits = tiny_vlm(torch.tensor([seq]), pixel_values=px[row : row + 1]).logits
            seq.append(int(logits[0, -1].argmax()))
        assert new[row].tolist() == seq[len(prompt) :]


def test_module_groups_cover_all_parameters(tiny_vlm):
    groups = tiny_vlm.module_groups()
    covered = {id(p) for g in ("vision", "resampler", "llm") for m in groups[g] for p in m.parameters()}
    assert covered == {id(p) for p in tiny_vlm.parameters()}
    emb = {id(p) for m in groups["embeddings"] for p in m.parameters()}
    assert emb == {
        id(tiny_vlm.llm.get_input_embeddings().weight),
        id(tiny_vlm.llm.get_output_embeddings().weight),
    }


def test_gradient_checkpointing_keeps_loss_and_grads(tiny_vlm, batch):
    input_ids, pixel_values = batch
    grads = []
    for enabled in (False, True):
        model = copy.deepcopy(tiny_vlm).train()
        model.set_gradient_checkpointing(enabled)
        model(input_ids, pixel_values=pixel_values, labels=input_ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert model.vision.gradient_checkpointing and model.llm.model.gradient_checkpointing
    assert model.resampler_checkpointing
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


def test_a_checkpointed_resampler_keeps_only_its_input_for_backward(tiny_vlm):
    """Under a frozen ViT the resampler trains and, unless checkpointed, keeps its k/v projections, their
    casts and LayerNorm inputs for every image until the decoder's backward is done (1.4 GiB of a full-shape
    LoRA step); checkpointed it keeps its input and gives the same gradients."""
    pixels = images(4)
    kept, grads = [], []
    for enabled in (False, True):
        model = copy.deepcopy(tiny_vlm).train()
        model.vision.requires_grad_(False)
        model.resampler_checkpointing = enabled
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t, keep=saved.append: keep(t) or t, lambda t: t):
            features = model.encode_images(pixels)
        kept.append(sum(t.numel() * t.element_size() for t in saved if not isinstance(t, torch.nn.Parameter)))
        features.square().sum().backward()
        grads.append({n: p.grad for n, p in model.resampler.named_parameters()})
    patches = 4 * tiny_vlm.config.vision.grid**2 * tiny_vlm.config.vision.width * 4  # the ViT's fp32 output
    assert kept[1] == patches < kept[0] / 4
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_bf16_cuda_forward_backward_and_generate(tiny_vlm, batch):
    model = copy.deepcopy(tiny_vlm).to("cuda", torch.bfloat16).train()
    input_ids, pixel_values = (t.cuda() for t in batch)
    out = model(input_ids, pixel_values=pixel_values.bfloat16(), labels=input_ids)
    assert out.loss_sum.dtype == torch.float32 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    new = model.eval().generate(
        input_ids, pixel_values=pixel_values, max_new_tokens=3, do_sample=False, eos_token_id=None
    )
    assert new.shape == (2, 3)
