"""The application: options, text encoders, the generation and editing pipelines, batches,
reports and outputs."""
