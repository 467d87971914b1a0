"""dynvm's HTTP face: the seed-compatible legacy routes (and, later, the JSON API)."""
