"""Self-speculation: exit views that share the target's weights, DEL's rule and shadow tokens, both methods."""

import math
import threading

import pytest
import torch

from spectune.bench import Settings, contender, run_bench
from spectune.engine.drafter import StepOutcome
from spectune.engine.loop import Decoder
from spectune.engine.runner import CausalLM
from spectune.engine.sampling import Sampling
from spectune.trees.draft import tree_inputs
from spectune.methods import METHODS
from spectune.methods.base import Models
from spectune.methods.early_exit import ExitHead, decoder_layers, exit_view
from spectune.methods.selfspec import (
    RoundCosts,
    ShadowWindow,
    del_choice,
    expected_tokens,
    layer_costs,
    measured_costs,
    shadow_agreement,
    tokens_per_cost,
)
from spectune.pair import load_pair
from spectune.pair_ref import PairRef
from spectune.prompts import load_prompts
from support import random_llama

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.fixture(scope="module")
def target():
    return random_llama(seed=7, vocab=32, layers=4, hidden=32)


def final_layers_as_identity(model, keep: int):
    """Zero the output projections of every block after `keep`: they add nothing to the residual
    stream, so exiting after block `keep` gives exactly the full model's logits."""
    with torch.no_grad():
        for block in decoder_layers(model)[keep:]:
            block.self_attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
    return model


def scramble_block(model, index: int):
    """Blow up one block's contribution, so exits before it no longer predict what exits after it do."""
    with torch.no_grad():
        block = decoder_layers(model)[index]
        block.self_attn.o_proj.weight.mul_(30.0)
        block.mlp.down_proj.weight.mul_(30.0)
    return model


def hook_count(model) -> int:
    return sum(len(block._forward_hooks) for block in decoder_layers(model))


def hook_count_with_transformers_capture(model) -> int:
    """The blocks' hooks once transformers has installed its own output-capturing hooks (lazily, on the
    first forward asking for hidden states; inactive outside such a forward): any further hook is ours."""
    with torch.no_grad():
        model(input_ids=torch.tensor([[0]]), output_hidden_states=True)
    return hook_count(model)


# --- exit views ---------------------------------------------------------------------------------


def test_exit_view_shares_every_tensor_with_the_target(target):
    view = exit_view(target, 2)
    target_storage = {t.data_ptr() for t in [*target.parameters(), *target.buffers()]}
    assert view.lm_head.weight.data_ptr() == target.lm_head.weight.data_ptr()
    assert all(t.data_ptr() in target_storage for t in [*view.parameters(), *view.buffers()])
    assert view.config.num_hidden_layers == 2 and target.config.num_hidden_layers == 4
    assert len(decoder_layers(view)) == 2


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_exit_view_logits_are_the_head_on_that_layer(target, layer):
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        hidden = target(input_ids=ids, output_hidden_states=True).hidden_states[layer][0]  # [T, d]
    expected = ExitHead(target)(hidden)  # [T, V]
    lm = CausalLM(exit_view(target, layer))
    first = lm.forward(PROMPT[:5])
    rest = lm.forward(PROMPT[5:])  # through the view's own KV cache
    assert len(lm.cache.hf.layers) == layer
    torch.testing.assert_close(torch.cat([first, rest]), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 4, 9])
def test_exit_view_rejects_layers_outside_1_to_L_minus_1(target, layer):
    with pytest.raises(ValueError, match=r"exit_layer must be in 1\.\.3 \(the target has 4 layers\)"):
        exit_view(target, layer)


def test_a_one_layer_target_cannot_self_speculate():
    with pytest.raises(ValueError, match="needs a target with >= 2 layers"):
        exit_view(random_llama(seed=1, layers=1), 1)


# --- layer outputs of a verification ----------------------------------------------------------------


def block_output(output) -> torch.Tensor:
    hidden = output[0] if isinstance(output, tuple) else output  # [1, n, d]
    return hidden[0].clone()


def test_verify_hands_back_exactly_the_block_outputs_a_forward_hook_sees(target):
    before = hook_count_with_transformers_capture(target)
    lm = CausalLM(target)
    lm.forward(PROMPT[:3])
    seen: dict[int, torch.Tensor] = {}
    blocks = decoder_layers(target)
    handles = [  # what spectune's former recorder did: a hook on block l-1 (exit after layer l)
        blocks[layer - 1].register_forward_hook(lambda m, a, out, layer=layer: seen.__setitem__(layer, block_output(out)))
        for layer in (1, 3)
    ]
    try:
        inputs = tree_inputs(tuple(range(-1, len(PROMPT) - 4)), 3)  # the rest of the prompt as a chain
        verified = lm.verify(PROMPT[3:], inputs.positions, inputs.mask, hidden_layers=(3, 1))
    finally:
        for handle in handles:
            handle.remove()
    assert sorted(verified.hidden) == [1, 3] and verified.hidden[1].shape == (len(PROMPT) - 3, 32)
    assert all(torch.equal(verified.hidden[layer], seen[layer]) for layer in (1, 3))
    with torch.no_grad():
        reference = target(input_ids=torch.tensor([PROMPT]), output_hidden_states=True)
    torch.testing.assert_close(verified.hidden[3], reference.hidden_states[3][0, 3:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(verified.logits, reference.logits[0, 3:], rtol=1e-5, atol=1e-5)
    assert lm.verify([7], torch.tensor([[len(PROMPT)]]), None).hidden == {}  # nothing asked, nothing kept
    assert hook_count(target) == before


@pytest.mark.parametrize("layer", [0, 5])
def test_verify_hands_back_only_block_outputs_of_the_model(target, layer):
    lm = CausalLM(target)  # 1..L-1: block outputs; L: the final norm's output (tests/unit/test_heads_engine.py)
    with pytest.raises(ValueError, match=r"hidden layers must be in 1\.\.4 \(the model has 4\)"):
        lm.verify([1, 2], torch.tensor([[0, 1]]), None, hidden_layers=(layer,))
    assert len(lm.cache) == 0


# --- DEL's rule ---------------------------------------------------------------------------------


@pytest.mark.parametrize("a", [0.0, 0.3, 0.9])
@pytest.mark.parametrize("d", [1, 4])
def test_expected_tokens_is_the_closed_form(a, d):
    assert expected_tokens(a, d) == pytest.approx((1 - a ** (d + 1)) / (1 - a))


def test_layer_costs_give_dels_formula():
    a, l, d, total = 0.8, 2, 3, 6
    assert tokens_per_cost(a, l, d, layer_costs([1, 2], total)) == pytest.approx((1 - a ** (d + 1)) / (1 - a) / (d * l + total))


def test_full_acceptance_has_no_division_by_zero():
    assert expected_tokens(1.0, 5) == 6
    assert tokens_per_cost(1.0, 2, 5, layer_costs([2], 6)) == pytest.approx(6 / 16)


def test_del_choice_is_the_brute_force_maximum():
    acceptance = {1: 0.35, 2: 0.7, 3: 0.8, 4: 0.95, 5: 0.97}
    best = max(
        ((l, d) for l in acceptance for d in range(1, 9)),
        key=lambda c: (1 - acceptance[c[0]] ** (c[1] + 1)) / (1 - acceptance[c[0]]) / (c[1] * c[0] + 6),
    )
    assert del_choice(acceptance, layer_costs(acceptance, 6), 8) == best


def test_del_choice_follows_acceptance():
    costs = layer_costs([1, 2, 3], 6)
    assert del_choice({1: 0.99, 2: 0.99}, costs, 8) == (1, 8)  # a cheap layer that always agrees: long drafts
    assert del_choice({1: 0.05, 3: 0.95}, costs, 8)[0] == 3  # a useless shallow exit loses to a good deeper one
    assert del_choice({1: 0.05, 3: 0.1}, costs, 8)[1] == 1  # nothing agrees: draft as little as possible
    with pytest.raises(ValueError, match="at least one exit layer"):
        del_choice({}, costs, 8)


def test_a_fixed_cost_per_pass_shortens_drafts_and_deepens_exits():
    acceptance = {1: 0.6, 2: 0.75, 3: 0.85}
    by_layers = del_choice(acceptance, layer_costs(acceptance, 6), 8)
    overhead = 3.0  # every pass also pays embedding, head and framework: 3 layers' worth
    by_time = del_choice(acceptance, RoundCosts({l: l + overhead for l in acceptance}, 6 + overhead, 0.0), 8)
    assert by_time[0] > by_layers[0] and by_time[1] <= by_layers[1]


def test_measured_costs_time_every_candidate_layer(target):
    costs = measured_costs(CausalLM(target), [1, 2, 3], max_draft_len=4)
    assert sorted(costs.draft) == [1, 2, 3]
    assert all(seconds > 0 for seconds in costs.draft.values()) and costs.verify_base > 0
    assert costs.verify_per_token >= 0


def test_shadow_window_slides_and_smooths():
    window = ShadowWindow([1, 2], size=3)
    assert window.estimate() == {1: 0.5, 2: 0.5}  # nothing seen yet
    window.add({1: [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], 2: [1.0]})
    assert window.estimate() == {1: pytest.approx(4 / 5), 2: pytest.approx(2 / 3)}  # layer 1 keeps only the last 3
    assert window.overall() == {1: 0.5, 2: 1.0}


# --- shadow tokens --------------------------------------------------------------------------------


def test_shadow_agreement_greedy_compares_argmax_at_the_path_rows():
    target_logits = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])  # argmax 0, 1, 2
    hidden = {1: torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 0, 5.0]]), 2: target_logits.clone()}
    agree = shadow_agreement(lambda h: h, hidden, target_logits, rows=[0, 2], sampling=Sampling())
    assert agree == {1: [1.0, 1.0], 2: [1.0, 1.0]}
    agree = shadow_agreement(lambda h: h, hidden, target_logits, rows=[1], sampling=Sampling())
    assert agree == {1: [0.0], 2: [1.0]}


def test_shadow_agreement_sampling_is_the_acceptance_probability():
    target_logits = torch.tensor([[0.0, 0.0], [0.0, -math.inf]])  # p = [.5, .5] then [1, 0]
    hidden = {1: torch.tensor([[0.0, 0.0], [-math.inf, 0.0]])}  # q = [.5, .5] then [0, 1]
    agree = shadow_agreement(lambda h: h, hidden, target_logits, rows=[0, 1], sampling=Sampling(1.0))
    assert agree[1] == pytest.approx([1.0, 0.0])  # sum min(p, q)


# --- the methods ----------------------------------------------------------------------------------


def decode(method, knobs, model, prompt=PROMPT, n=24, sampling=Sampling()):
    models = Models(CausalLM(model), None)
    drafter = METHODS.build(method, knobs, models)
    return drafter, Decoder(models.target, drafter).generate(prompt, n, sampling, seed=0)


def test_layerskip_through_an_exact_exit_accepts_every_draft():
    model = final_layers_as_identity(random_llama(seed=3, vocab=32, layers=4, hidden=32), keep=2)
    drafter, generation = decode("layerskip", {"exit_layer": 2, "draft_len": 5}, model)
    assert all(step.accepted == step.drafted for step in generation.steps)
    assert drafter.exit_layer_acceptance() == {2: 1.0}


@pytest.mark.parametrize("exact_from, best_layer", [(1, 1), (2, 2)])
def test_del_picks_the_shallowest_exact_exit_and_drafts_long(exact_from, best_layer):
    model = final_layers_as_identity(random_llama(seed=3, vocab=32, layers=4, hidden=32), keep=exact_from)
    if exact_from == 2:
        scramble_block(model, 1)  # exit 1 now disagrees with the target
    before = hook_count_with_transformers_capture(model)
    drafter, generation = decode("del", {"max_draft_len": 6, "cost": "layers", "shadow_every": 1}, model, n=60)
    acceptance = drafter.exit_layer_acceptance()
    assert all(acceptance[layer] == 1.0 for layer in range(exact_from, 4))
    assert all(acceptance[layer] < 0.5 for layer in range(1, exact_from))
    assert drafter.chosen.most_common(1)[0][0] == (best_layer, 6)  # deep enough, no deeper; longest allowed
    assert hook_count(model) == before


@pytest.mark.parametrize("every", [1, 3])
def test_del_computes_shadows_on_every_nth_round(target, every):
    drafter, generation = decode("del", {"shadow_every": every, "cost": "layers"}, target, n=30)
    rounds = len(generation.steps)
    assert drafter.shadowed_rounds == math.ceil(rounds / every)


def test_del_and_layerskip_equal_greedy_decoding(target):
    _, reference = decode("ar", {}, target)
    for method, knobs in [("layerskip", {"exit_layer": 1, "draft_len": 3}), ("del", {"window": 4})]:
        _, generation = decode(method, knobs, target)
        assert generation.tokens == reference.tokens, method


def observed_steps(drafter):
    """Record (committed sequence when drafting, outcome) of every step the drafter sees."""
    steps: list[list] = []
    draft, observe = drafter.draft, drafter.observe

    def recording_draft(context):
        steps.append([context.sequence])
        return draft(context)

    def recording_observe(outcome: StepOutcome) -> None:
        steps[-1].append(outcome)
        observe(outcome)

    drafter.draft, drafter.observe = recording_draft, recording_observe
    return steps


def test_del_shadows_from_the_verification_equal_a_separate_exit_view_forward(target):
    models = Models(CausalLM(target), None)
    drafter = METHODS.build("del", {"shadow_every": 1, "cost": "layers", "window": 1000}, models)
    steps = observed_steps(drafter)
    Decoder(models.target, drafter).generate(PROMPT, 24)
    head = ExitHead(target)
    agreements: dict[int, list[float]] = {layer: [] for layer in (1, 2, 3)}
    for sequence, outcome in steps:
        assert sorted(outcome.hidden) == [1, 2, 3]
        verified = list(sequence[:-1]) + list(outcome.tree.tokens)  # the target's cache, then the tree (a chain)
        path = list(outcome.verdict.path)
        for layer in (1, 2, 3):
            view_logits = CausalLM(exit_view(target, layer)).forward(verified)[len(sequence) - 1 :]  # [n+1, V]
            torch.testing.assert_close(head(outcome.hidden[layer]), view_logits, rtol=1e-4, atol=1e-4)
            shadow = view_logits[path].argmax(dim=-1) == outcome.target_logits[path].argmax(dim=-1)
            agreements[layer] += shadow.float().tolist()
    overall = {layer: sum(values) / len(values) for layer, values in agreements.items()}
    assert drafter.exit_layer_acceptance() == pytest.approx(overall)
    assert drafter.shadowed_rounds == len(steps)


def del_requests(target, prompt, start=None):
    """Three del generations of `prompt` by one decoder (own runner and KV cache) over the shared target."""
    models = Models(CausalLM(target), None)
    drafter = METHODS.build("del", {"shadow_every": 1, "cost": "layers", "max_draft_len": 4}, models)
    decoder = Decoder(models.target, drafter)
    if start is not None:
        start.wait()
    return [decoder.generate(prompt, 40).tokens for _ in range(3)], drafter


def test_two_del_requests_at_once_on_one_target_both_equal_greedy_decoding(target):
    prompts = ([3, 1, 4, 1, 5], [2, 7, 1, 8, 2, 8, 1, 8])
    reference = [decode("ar", {}, target, prompt=p, n=40)[1].tokens for p in prompts]
    alone = [del_requests(target, p)[1].exit_layer_acceptance() for p in prompts]
    start = threading.Barrier(len(prompts))
    results: dict[int, object] = {}

    def request(i: int) -> None:
        try:
            results[i] = del_requests(target, prompts[i], start)
        except BaseException as err:  # surfaced below, in the test's thread
            results[i] = err

    threads = [threading.Thread(target=request, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(len(prompts)):
        assert not isinstance(results[i], BaseException), results[i]
        tokens, drafter = results[i]
        assert all(t == reference[i] for t in tokens), f"request {i} differs from greedy decoding"
        assert drafter.exit_layer_acceptance() == pytest.approx(alone[i]), "shadows saw only their own request"


@pytest.mark.parametrize("layers, expected", [(2, 1), (4, 1), (8, 2), (32, 8)])
def test_layerskip_default_exit_is_a_quarter_of_the_layers(layers, expected):
    model = random_llama(seed=1, vocab=16, layers=layers, hidden=16)
    assert METHODS.build("layerskip", {}, Models(CausalLM(model), None)).exit_layer == expected


def test_bad_exit_layers_name_the_field_and_range(target):
    models = Models(CausalLM(target), None)
    with pytest.raises(ValueError, match=r"exit_layer must be in 1\.\.3"):
        METHODS.build("layerskip", {"exit_layer": 4}, models)
    with pytest.raises(ValueError, match=r"max_exit_layer must be in 1\.\.3 \(the target has 4 layers\), got 5"):
        METHODS.build("del", {"max_exit_layer": 5}, models)
    with pytest.raises(ValueError, match=r"min_exit_layer \(3\) must be <= max_exit_layer \(2\)"):
        METHODS.build("del", {"min_exit_layer": 3, "max_exit_layer": 2}, models)
    with pytest.raises(ValueError, match="min_exit_layer"):
        METHODS.build("del", {"min_exit_layer": 4}, models)
    with pytest.raises(ValueError, match="exit_layer"):
        METHODS.knobs("layerskip", {"exit_layer": 0})


# --- on the micro pair (trained with an early-exit loss) -----------------------------------------------


def test_bench_reports_acceptance_by_exit_layer(micro_pair):
    pair = load_pair(PairRef.model_validate({"dir": micro_pair}))
    prompts = load_prompts("default", limit=3)
    settings = Settings(max_new_tokens=16, repeats=1, warmup=0)
    configs = [
        METHODS.config("layerskip", {"exit_layer": 2, "draft_len": 3}),
        METHODS.config("del", {"max_draft_len": 4}),
        METHODS.config("sps", {}),
    ]
    results = run_bench(pair, [contender(pair, c) for c in configs], prompts, settings)
    rows = {result.method: result.as_dict() for result in results}
    assert rows["layerskip"]["lossless"] and rows["del"]["lossless"]
    assert list(rows["layerskip"]["acceptance_by_exit_layer"]) == ["2"]
    assert 0 < rows["layerskip"]["acceptance_by_exit_layer"]["2"] <= 1  # the early-exit loss makes layer 2 useful
    assert list(rows["del"]["acceptance_by_exit_layer"]) == ["1", "2", "3"]
    assert rows["del"]["acceptance_by_exit_layer"]["3"] > 0.3
    assert rows["sps"]["acceptance_by_exit_layer"] is None and rows["ar"]["acceptance_by_exit_layer"] is None
    choices = rows["del"]["exit_choices"]  # {"l,d": rounds}: every round drafted with one (l, d) in range
    assert choices and all(1 <= int(k.split(",")[0]) <= 3 and 1 <= int(k.split(",")[1]) <= 4 for k in choices)
    assert sum(choices.values()) == rows["del"]["target_calls"]  # one round per step (1 pass, no warm-up)
    assert rows["layerskip"]["exit_choices"] is None and rows["sps"]["exit_choices"] is None
