"""The centralised reference point (DESIGN.md, trustworthy comparisons): not a federation. Math: one client, so
the FedIT rule is the identity (:mod:`fedlora.aggregation.fedit`)."""

from fedlora.federation.protocol import Method, register


@register
class Central(Method):
    """One model trained on the union of the clients' training data, with as many examples per round as the
    federation processes (the sampled clients × local steps × batch): the upper reference a federated method is
    read against. The run builds one pooled client (:func:`fedlora.federation.tasks.pooled`) that trains
    ``round(fraction × clients) × local_steps`` steps per round with a fresh optimizer each round, as a client
    does; local accuracy is that model on the union of the clients' local test shards (their example-weighted
    mean). Nothing is communicated: bytes are 0. With one client it is FedIT exactly. In-process only."""

    name = "central"
    title = "centralised training (reference point)"
    rule = "fedit"
    server_opt_refusal = "it is a reference point that pools the clients' data, not a federation"
    summary = "reference: one model on the union of the clients' data, the federation's examples per round"
    up = "0"
    down = "0"
    exact = True
    exactness = "reference"
    pooled = True
    communicates = False
    in_process_only = "it pools every client's training data in one process, which a Flower deployment exists to avoid"
