"""Ray adapters and the command line of the attribution system; the logic lives in
``attribution_core``."""
