"""The command line's commands: each module declares a command's arguments and runs it.

A command imports its stage (``pipelines.index.job``, ``pipelines.serve.runner``, ...: Ray
Data, Train or Serve, diffusers and transformers) inside its run function, so building the
parser -- ``attribution --help``, an argument error, or any other command -- never loads
them. Benchmarks go further (``pipelines.commands.bench``): their modules are imported by
name only when one runs.
"""
