"""The local-training reference point (DESIGN.md, trustworthy comparisons): clients never communicate. Math: none
(the FedIT rule is declared but receives nothing)."""

from fedlora.federation.protocol import Method, ServerUpdate, register


@register
class Local(Method):
    """Every client trains its own adapter and head on its own data and never sends anything: the lower reference
    for what federation adds. Global accuracy is the mean of the clients' own models on the global test set (every
    client that has trained so far); local accuracy, as for any method, each client's model on its own test shard.
    In-process only (on Flower the server never sees a client's model, so it could not score one)."""

    name = "local"
    title = "local training only (reference point)"
    rule = "fedit"
    server_opt_refusal = "its clients share nothing, so the server has no result to step"
    summary = "reference: no server; global accuracy = mean of the clients' own models on the global test set"
    up = "0"
    down = "0"
    exactness = "reference"
    personalised = True
    communicates = False
    in_process_only = "its global accuracy scores every client's own model, which a Flower server never receives"

    def private(self, h):
        return list(h.trainable_names)

    def aggregate(self, h, uploads, weights, current, ctx):
        return ServerUpdate(broadcast={})

    def scored_states(self, held, private):
        return [held[c] | state for c, state in sorted(private.items())]
