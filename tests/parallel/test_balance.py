"""The planner for packed documents: slot costs worked out by hand, valid placements (a
permutation of the documents, a slot table), short documents kept inside one slot, and a
slowest rank close to the mean where contiguous and zigzag layouts are far from it."""
import numpy as np
import pytest

from lasp2.parallel.balance import (LayerCosts, assign_slots, document_order, named_layout_costs, plan_placement,
                                    slot_costs)

PAIRS = LayerCosts(per_token=0.0, per_pair=1.0)  # count the softmax kernel's (query, key) products only


def lognormal_lengths(total: int, seed: int, mu=7.5, sigma=1.4) -> list[int]:
    """Heavy-tailed document lengths (web and code corpora) summing to `total`."""
    rng = np.random.default_rng(seed)
    lengths = []
    while sum(lengths) < total:
        lengths.append(max(1, int(rng.lognormal(mu, sigma))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def test_slot_costs_by_hand():
    # documents of 3 and 5 tokens, slots of 4: slot 0's queries against keys 0..3 (4 x 4); slot 1's
    # first token is in document 1, which starts at 3: keys 3..7 (4 x 5)
    assert slot_costs([3, 5], 4, PAIRS) == [16, 20]
    assert slot_costs([8], 4, LayerCosts(per_token=1.0, per_pair=0.0, per_slot=0.5)) == [4.5, 4.5]
    # one document of 8 over 4 zigzag slots of 2: rank 0 holds slots 0 and 3 (2 x 2 + 2 x 8), rank 1
    # slots 1 and 2 (2 x 4 + 2 x 6); contiguous: 4 x 4 | 4 x 8
    assert named_layout_costs([8], "zigzag", 2, PAIRS) == (20, 20)
    assert named_layout_costs([8], "contiguous", 2, PAIRS) == (16, 32)


def test_short_documents_stay_inside_one_slot_when_they_can():
    lengths = [20, 3, 5, 6, 2, 4, 8]  # 48 tokens, slots of 8: 20 and 8 fill 3.5 slots, the rest packs exactly
    order = document_order(lengths, 8)
    assert sorted(order) == list(range(len(lengths))) and order[:2] == [0, 6]  # the long ones first
    start, crossing = 0, []
    for i in order:
        if lengths[i] < 8 and start // 8 != (start + lengths[i] - 1) // 8:
            crossing.append(i)
        start += lengths[i]
    assert crossing == []


def test_assign_slots_gives_every_rank_the_same_count_and_balances():
    layout = assign_slots([9.0, 1.0, 1.0, 1.0, 4.0, 4.0], 2)
    assert sorted(s for r in range(2) for s in layout.slots(r)) == list(range(6))
    assert {len(layout.slots(r)) for r in range(2)} == {3}
    loads = [sum([9.0, 1.0, 1.0, 1.0, 4.0, 4.0][s] for s in layout.slots(r)) for r in range(2)]
    assert sorted(loads) == [4.0 + 4.0 + 1.0, 9.0 + 1.0 + 1.0]  # LPT: 9 | 4, 4, 1 | then 1, 1 to the first


@pytest.mark.parametrize("world", [2, 4, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_planner_beats_contiguous_and_zigzag_on_heavy_tailed_lengths(world, seed):
    costs = LayerCosts.for_model(linear_layers=12, softmax_layers=4, heads=16, head_dim=128, rate=1e14)
    lengths = lognormal_lengths(65536 * world, seed)
    plan = plan_placement(lengths, world, costs)
    assert sorted(plan.order) == list(range(len(lengths)))
    assert sorted(s for r in range(world) for s in plan.layout.slots(r)) == list(range(plan.layout.n_slots))
    contiguous, zigzag = (named_layout_costs(lengths, name, world, costs) for name in ("contiguous", "zigzag"))
    assert max(plan.cost) <= min(max(contiguous), max(zigzag)) and plan.imbalance < 1.1


def test_bad_lengths_are_refused_with_the_rule():
    with pytest.raises(ValueError, match=r"at least one token; document\(s\) \[1\] have none"):
        plan_placement([4, 0, 4], 2, PAIRS)
    with pytest.raises(ValueError, match="document 0 has 9 tokens, more than the batch's 8"):
        plan_placement([9], 2, PAIRS, total=8)
    with pytest.raises(ValueError, match="the documents hold 6 tokens, the batch 8"):
        plan_placement([2, 4], 2, PAIRS, total=8)
    with pytest.raises(ValueError, match="do not divide into 2 ranks"):
        plan_placement([3, 4], 2, PAIRS, slots_per_rank=(1, 2))
