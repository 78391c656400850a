"""One module per tab: dataset, train, generate, export. Each has plain handler functions and a
`build(ctx)` that lays out its components and wires its events."""
