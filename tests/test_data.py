"""fedlora.data: loading labelled text offline, and federating it per DESIGN.md's evaluation protocol."""

import json
import re
import socket

import datasets
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.data import PARTITIONS, DataError, LabelledText, federate, load_labelled_text
from fedlora.data.sampling import int_column, stratified_choice


@pytest.fixture(scope="module")
def tweets():
    return load_labelled_text("tweets", limit=5000)


def synthetic(n, n_labels=3, seed=0):
    labels = np.random.default_rng(seed).integers(0, n_labels, n).tolist()
    names = [f"c{i}" for i in range(n_labels)]
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"text": [f"example {i}" for i in range(n)], "label": labels}, features=features)
    return LabelledText(ds, names, "synthetic")


def counts(ds, n_labels):
    return np.bincount(int_column(ds, "label"), minlength=n_labels)


def texts(ds):
    return list(ds["text"][:])


def entropy(hist):
    p = np.asarray(hist, dtype=float) / sum(hist)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


# ---------------------------------------------------------------- sources


def test_tweets_load_offline_with_three_classes(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the tweets corpus must load without network access")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(datasets, "load_dataset", no_network)
    data = load_labelled_text("tweets")
    assert data.label_names == ["negative", "neutral", "positive"]
    assert data.dataset.column_names == ["text", "label"]
    # 38,157 rows in the CSV; 915 repeated texts, 46 of them with conflicting labels, are dropped.
    assert counts(data.dataset, 3).tolist() == [15955, 14431, 6811]
    all_texts = texts(data.dataset)
    assert len(set(all_texts)) == len(all_texts) and all(t.strip() == t and t for t in all_texts)


def test_bbc_loads_five_sorted_topics():
    data = load_labelled_text("bbc")
    assert data.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    n = counts(data.dataset, 5)
    assert 2000 < n.sum() <= 2225 and n.min() > 300  # 2,225 articles less duplicates
    assert "Time Warner" in texts(data.dataset)[0]


def test_limit_is_stratified_and_seeded():
    full = counts(load_labelled_text("tweets").dataset, 3)
    a = load_labelled_text("tweets", limit=300, seed=1)
    b = load_labelled_text("tweets", limit=300, seed=1)
    c = load_labelled_text("tweets", limit=300, seed=2)
    assert np.all(np.abs(counts(a.dataset, 3) - 300 * full / full.sum()) < 1)
    assert texts(a.dataset) == texts(b.dataset) != texts(c.dataset)


def test_csv_with_string_labels_and_custom_columns(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text(
        "review,verdict,stars\n"
        "great film,pos,5\n"
        "awful,neg,1\n"
        "  ,pos,4\n"  # empty text: dropped
        "great film,pos,5\n"  # exact duplicate: one copy kept
        "so-so,neg,3\n"
        "so-so,pos,3\n"  # same text, two labels: both dropped
        "NA,neg,2\n"  # a real text, not a missing value
    )
    data = load_labelled_text(str(path), text_column="review", label_column="verdict")
    assert data.name == "reviews.csv" and data.label_names == ["neg", "pos"]
    assert list(zip(texts(data.dataset), data.dataset["label"][:])) == [("great film", 1), ("awful", 0), ("NA", 0)]
    by_stars = load_labelled_text(f"csv:{path}", text_column="review", label_column="stars")
    # Integer labels in numeric order, codes 0..C-1; "so-so" has one star rating, so it stays this time.
    assert by_stars.label_names == ["1", "2", "3", "5"]
    assert by_stars.dataset["label"][:] == [3, 0, 2, 1]


def test_jsonl_and_json_with_integer_labels(tmp_path):
    rows = [{"body": f"text {i}", "y": 10 + i % 3} for i in range(9)]
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    plain = tmp_path / "data.json"
    plain.write_text(json.dumps(rows))
    for spec in (str(jsonl), f"jsonl:{jsonl}", str(plain)):
        data = load_labelled_text(spec, text_column="body", label_column="y")
        assert data.label_names == ["10", "11", "12"]
        assert data.dataset["label"][:] == [i % 3 for i in range(9)]


def test_hub_spec_maps_classlabel_and_drops_unlabelled(monkeypatch):
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        features = datasets.Features(
            {"sentence": datasets.Value("string"), "gold": datasets.ClassLabel(names=["no", "yes"])}
        )
        return datasets.Dataset.from_dict({"sentence": ["a", "b", "c"], "gold": [1, 0, -1]}, features=features)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_labelled_text("hf:glue:sst2", text_column="sentence", label_column="gold", split="validation")
    assert calls == [("glue", "sst2", "validation")]
    assert data.label_names == ["no", "yes"] and data.dataset["label"][:] == [1, 0]
    load_labelled_text("someone/reviews", text_column="sentence", label_column="gold")
    assert calls[-1] == ("someone/reviews", None, "train")


def test_hub_failure_is_one_clear_error(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"could not load 'tweet' from the Hugging Face Hub .*pass 'tweets'"):
        load_labelled_text("tweet")


@pytest.mark.parametrize(
    ("content", "kwargs", "message"),
    [
        ("text,stars\ngood,5\nbad,1\n", {},
         "'reviews.csv' has no column 'label' (columns: text, stars); pass --label-column stars"),
        ("body,label\ngood,pos\nbad,neg\n", {},
         "'reviews.csv' has no column 'text' (columns: body, label); pass --text-column body"),
        ("text,label\ngood,pos\nfine,pos\n", {}, "'reviews.csv' has only one class ('pos') in column 'label'"),
        ("text,label\n ,pos\n,neg\n", {}, "'reviews.csv' has no usable rows (2 read; 2 with empty text or no label)"),
        ("text,label\ngood,pos\nbad,neg\n", {"limit": 1}, "limit=1 leaves too few examples"),
    ],
)
def test_bad_files_raise_one_sentence(tmp_path, content, kwargs, message):
    path = tmp_path / "reviews.csv"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load_labelled_text(str(path), **kwargs)
    assert str(err.value).startswith(message)
    assert str(err.value).count(". ") == 0  # one sentence


def test_unknown_file_and_format(tmp_path):
    with pytest.raises(DataError, match=r"^no such file 'missing\.csv'; check the path"):
        load_labelled_text("missing.csv")
    (tmp_path / "data.tsv").write_text("text\tlabel\n")
    with pytest.raises(DataError, match=r"is not a \.csv, \.json or \.jsonl file"):
        load_labelled_text(str(tmp_path / "data.tsv"))


# ---------------------------------------------------------------- sampling


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=1, max_size=60), st.data())
def test_stratified_choice_matches_the_label_mix(labels, draw):
    labels = np.array(labels)
    n = draw.draw(st.integers(0, len(labels)))
    picked = stratified_choice(labels, n, np.random.default_rng(0))
    assert len(picked) == len(set(picked.tolist())) == n
    for c in np.unique(labels):
        share = n * np.mean(labels == c)
        assert np.floor(share) <= np.sum(labels[picked] == c) <= np.ceil(share)


# ---------------------------------------------------------------- federate


@pytest.mark.parametrize("partition", PARTITIONS)
def test_partitions_are_disjoint_and_cover_the_pool(tweets, partition):
    fed = federate(tweets, n_clients=6, partition=partition, test_examples=400, seed=3)
    assert fed.n_labels == 3 and len(fed.clients) == 6 and [c.cid for c in fed.clients] == list(range(6))
    shards = [texts(c.train) + texts(c.test) for c in fed.clients]
    everything = texts(fed.global_test) + [t for shard in shards for t in shard]
    assert len(everything) == len(set(everything)) == len(tweets)  # disjoint, and nothing lost
    # The global test set keeps the natural label mix: within one example of proportional per class.
    natural = counts(tweets.dataset, 3) / len(tweets)
    assert np.all(np.abs(counts(fed.global_test, 3) - 400 * natural) < 1)


def test_local_split_keeps_the_shard_label_mix(tweets):
    fed = federate(tweets, n_clients=8, alpha=0.5, local_test_fraction=0.25, seed=1)
    for row in fed.partition_summary():
        train, test = np.array(row["train_labels"]), np.array(row["test_labels"])
        shard = train + test
        assert row["n_test"] == int(0.25 * shard.sum() + 0.5) == test.sum() and row["n_train"] == train.sum()
        assert np.all(np.abs(test - row["n_test"] * shard / shard.sum()) < 1)


def test_cap_keeps_each_client_label_mix(tweets):
    full = federate(tweets, n_clients=5, alpha=0.3, seed=4)
    capped = federate(tweets, n_clients=5, alpha=0.3, seed=4, examples_per_client=40)
    for a, b in zip(full.partition_summary(), capped.partition_summary()):
        whole = np.add(a["train_labels"], a["test_labels"])
        kept = np.add(b["train_labels"], b["test_labels"])
        assert kept.sum() == min(40, whole.sum()) and (b["n_train"], b["n_test"]) == (32, 8)
        assert np.all(np.abs(kept - 40 * whole / whole.sum()) < 1)
    assert "capped at 40 per client" in capped.scheme


@pytest.mark.parametrize("k", [1, 2])
def test_pathological_clients_hold_at_most_k_labels(tweets, k):
    fed = federate(tweets, n_clients=6, partition="pathological", labels_per_client=k, examples_per_client=60)
    held = [np.flatnonzero(np.add(r["train_labels"], r["test_labels"])) for r in fed.partition_summary()]
    assert all(len(labels) == k for labels in held)
    assert set(np.concatenate(held).tolist()) == {0, 1, 2}  # deterministic assignment uses every label


def test_dirichlet_low_alpha_is_more_skewed_than_iid(tweets):
    def mean_entropy(fed):
        return np.mean([entropy(np.add(r["train_labels"], r["test_labels"])) for r in fed.partition_summary()])

    iid = federate(tweets, n_clients=10, partition="iid", examples_per_client=100)
    skewed = federate(tweets, n_clients=10, alpha=0.1, examples_per_client=100)
    natural = entropy(counts(tweets.dataset, 3))  # ≈ 1.03 nats
    assert abs(mean_entropy(iid) - natural) < 0.05
    assert mean_entropy(skewed) < natural - 0.4


@pytest.mark.parametrize("partition", PARTITIONS)
def test_same_seed_same_partition_other_seed_different(tweets, partition):
    def snapshot(seed):
        fed = federate(tweets, n_clients=4, partition=partition, alpha=0.5, seed=seed, examples_per_client=50)
        return [texts(fed.global_test)] + [texts(c.train) + ["|"] + texts(c.test) for c in fed.clients]

    assert snapshot(7) == snapshot(7)
    assert snapshot(7) != snapshot(8)


def test_dirichlet_falls_back_to_self_balancing_and_says_so():
    # Found by search: plain Dirichlet(0.1) cannot give all 10 clients 10 of these 900 examples; balanced can.
    fed = federate(synthetic(1000), n_clients=10, alpha=0.1, test_examples=100, seed=0)
    assert fed.scheme == "dirichlet(alpha=0.1, self-balanced), seed 0"
    assert min(c.train.num_rows + c.test.num_rows for c in fed.clients) >= 10


def test_describe_and_summary(tweets):
    fed = federate(tweets, n_clients=3, partition="iid", test_examples=300, examples_per_client=20)
    lines = fed.describe().splitlines()
    assert len(lines) == 4 and lines[0].startswith("iid, capped at 20 per client, seed 0; 3 clients; global test 300")
    assert re.fullmatch(r"client +2: +16 train +4 test \| negative \d+  neutral \d+  positive \d+", lines[3])
    assert [r["n_train"] + r["n_test"] for r in fed.partition_summary()] == [20, 20, 20]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"partition": "random"}, "unknown partition 'random'; choose iid, dirichlet or pathological"),
        ({"alpha": 0}, "alpha=0 must be positive"),
        ({"alpha": -1.0}, "alpha=-1.0 must be positive"),
        ({"n_clients": 0}, "n_clients=0 is not a number of clients"),
        ({"n_clients": 101, "partition": "iid"}, "n_clients=101 is more than the 100 examples left"),
        ({"partition": "pathological", "labels_per_client": 0}, "labels_per_client=0 is outside 1..3"),
        ({"partition": "pathological", "labels_per_client": 4}, "labels_per_client=4 is outside 1..3"),
        ({"test_examples": 200}, "test_examples=200 must be between 1 and 199 to score the global model and leave a pool"),
        ({"test_examples": -1}, "test_examples=-1 must be between 1 and 199"),
        ({"test_examples": 0}, "test_examples=0 must be between 1 and 199"),  # the global model needs a test set
        ({"n_clients": 11}, "11 clients × min_partition_size=10 needs more than the 100 pool examples"),
        ({"local_test_fraction": 1.0}, "local_test_fraction=1.0 must be in [0, 1)"),
        ({"examples_per_client": 0}, "examples_per_client=0 leaves clients empty"),
        ({"n_clients": 10, "alpha": 0.01, "min_partition_size": 0, "test_examples": 160},
         "client 1 ended with 0 training examples under dirichlet(alpha=0.01)"),
        ({"n_clients": 10, "alpha": 0.05, "test_examples": 1},
         "dirichlet(alpha=0.05) left some of 10 clients below min_partition_size=10 of the 199 pool examples"),
    ],
)
def test_bad_federate_arguments_raise_one_sentence(kwargs, message):
    args = {"n_clients": 5, "test_examples": 100, **kwargs}
    with pytest.raises(DataError) as err:
        federate(synthetic(200), **args)
    assert str(err.value).startswith(message), str(err.value)
    assert str(err.value).count(". ") == 0 and "; " in str(err.value)  # one sentence: problem; fix
