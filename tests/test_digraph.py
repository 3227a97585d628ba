"""planner.digraph gives networkx's answers for the operations the planner uses."""

from __future__ import annotations

import random

import networkx
import pytest

from planner import digraph
from planner.graph import find_cycle

GRAPHS = 300


def random_edges(seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """A small random directed graph (self-loops and cycles included), as node and edge lists."""
    rng = random.Random(seed)
    nodes = [f"s{i}" for i in rng.sample(range(20), rng.randint(1, 9))]
    edges = [(rng.choice(nodes), rng.choice(nodes)) for _ in range(rng.randint(0, 2 * len(nodes)))]
    return nodes, edges


def both(seed: int) -> tuple[digraph.DiGraph, networkx.DiGraph]:
    nodes, edges = random_edges(seed)
    ours, theirs = digraph.DiGraph(), networkx.DiGraph()
    for graph in (ours, theirs):
        graph.add_nodes_from(nodes)
        for u, v in edges:
            graph.add_edge(u, v, kind="explicit")
    return ours, theirs


@pytest.mark.parametrize("seed", range(GRAPHS))
def test_the_same_answers_as_networkx(seed: int) -> None:
    ours, theirs = both(seed)
    assert list(ours.nodes) == list(theirs.nodes) and len(ours) == len(theirs)
    assert ours.edges() == list(theirs.edges())
    assert digraph.is_directed_acyclic_graph(ours) == networkx.is_directed_acyclic_graph(theirs)
    for node in theirs.nodes:
        assert list(ours.successors(node)) == list(theirs.successors(node))
        assert list(ours.predecessors(node)) == list(theirs.predecessors(node))
        assert digraph.descendants(ours, node) == networkx.descendants(theirs, node)
        assert digraph.ancestors(ours, node) == networkx.ancestors(theirs, node)
        try:
            expected = networkx.find_cycle(theirs, source=node)
        except networkx.NetworkXNoCycle:
            with pytest.raises(digraph.NetworkXNoCycle):
                digraph.find_cycle(ours, source=node)
        else:
            assert digraph.find_cycle(ours, source=node) == expected


def test_the_planted_graphs_have_cycles_and_acyclic_ones() -> None:
    """The comparison above covers both kinds (not only acyclic graphs)."""
    acyclic = [networkx.is_directed_acyclic_graph(both(seed)[1]) for seed in range(GRAPHS)]
    assert 30 < sum(acyclic) < GRAPHS - 30


def test_the_validation_cycle_is_named_from_the_first_service() -> None:
    graph = digraph.DiGraph()
    graph.add_edges_from([("runner", "cache"), ("gitea", "runner"), ("cache", "gitea")])
    graph.add_edge("wiki", "gitea")
    assert find_cycle(graph) == ["cache", "gitea", "runner", "cache"]
    graph = digraph.DiGraph()
    graph.add_edges_from([("a", "b"), ("b", "c")])
    assert find_cycle(graph) is None


def test_unknown_nodes_and_attributes() -> None:
    graph = digraph.DiGraph()
    graph.add_edge("a", "b", field="depends_on[0]")
    graph.add_edge("a", "b", kind="db")
    assert graph._succ["a"]["b"] == {"field": "depends_on[0]", "kind": "db"}
    assert "c" not in graph and [] not in graph
    with pytest.raises(KeyError, match="'c' is not in the graph"):
        digraph.descendants(graph, "c")
    with pytest.raises(KeyError, match="'c' is not in the graph"):
        list(graph.successors("c"))
