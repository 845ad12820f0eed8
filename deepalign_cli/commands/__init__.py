"""One module per `deepalign` subcommand: parse → load → call core → write atomically."""
