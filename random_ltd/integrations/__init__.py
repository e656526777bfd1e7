"""Framework adapters. Each subpackage imports its framework lazily: nothing here is needed by the core package."""
