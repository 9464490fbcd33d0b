"""Moving KV block bytes between two services' paged pools. Control stays on ZeroMQ; each
transport here only turns block ids into bytes on the wire and back."""
