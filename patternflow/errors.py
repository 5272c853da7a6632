"""The root of every exception patternflow raises, and the whole tree under it.

One ``except PatternflowError`` catches every failure of ours and nothing
else; each family lives with its subsystem. Where callers also catch a
builtin (a ``ValueError`` for bad input, a ``TimeoutError``), the class is
both (the builtin in brackets)::

    PatternflowError
     ├── InvalidMessage [ValueError]            a message's content or headers are invalid: a dead letter
     │    └── InvalidInput                      models.schema: a request's inputs do not match the model's schema
     │         └── UnknownModel                 models.registry: a request names a model the registry lacks
     ├── SettingsError [ValueError]             operators.settings: an environment variable does not parse
     ├── KafkaError                             operators.kafka.errors
     │    ├── KafkaSourceError                  the broker refused a read (unknown topic, auth, ...)
     │    ├── KafkaDeliveryError                a produced message was neither acknowledged nor dead-lettered
     │    ├── KafkaAdminError                   a topic could not be created or described
     │    ├── KafkaSecurityError                the client-security settings cannot work, or the broker refused them
     │    └── KafkaUnavailable                  the broker stayed unreachable past the outage limit
     ├── StateError                             state.errors: keyed state cannot be opened or used
     │    └── StateRecoveryError                the store cannot return to the snapshot asked for
     ├── LLMError [RuntimeError]                models.llm: the LLM server failed or answered in another form
     │    ├── LLMRefused                        the server refused the request (not retried)
     │    └── LLMUnavailable                    the server did not take the request (retried; not billed)
     ├── CallInDoubt                            dataflows.agent: a model call may have been made before a crash
     ├── RecordedFailure                        dataflows.agent: a model call that failed before a restart
     ├── ToolError                              dataflows.agent.tools: a tool could not do what was asked
     │    └── TransientToolError                a tool failed for a reason that may pass (retried)
     ├── JobError                               dataflows.batch_inference: a batch job cannot run as asked
     ├── InferenceTimeout [TimeoutError]        clients.inference: no reply within the caller's timeout
     ├── JobSubmitError [RuntimeError]          clients.jobs: the broker did not take a job submission
     ├── UseCaseError [ValueError]              advisor.advise: a use case is not a valid description
     └── ReportError                            advisor.report: Prometheus could not answer a report's query

Third-party exceptions (librdkafka's ``KafkaException``, aiohttp's and httpx's
errors, RocksDB's) are translated into these where they enter our code, with
the original chained as the cause. Any other exception is a bug.
"""

from __future__ import annotations

__all__ = ["InvalidMessage", "PatternflowError"]


class PatternflowError(Exception):
    """Base of every exception patternflow raises; never raised itself."""


class InvalidMessage(PatternflowError, ValueError):
    """A message's content or headers are invalid: the one exception that makes a dead letter.

    Decoders, validators and schemas raise it; any other exception is a bug and stops the dataflow.
    """
