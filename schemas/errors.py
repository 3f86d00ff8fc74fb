"""The exception hierarchy of Arus.

ArusError
├── ConfigError        bad settings, rules or catalogue files (raised at load, never mid-stream)
├── InfraError         a dependency (Kafka, PostgreSQL, MQTT) cannot be reached or failed
│   └── EmbeddedServiceError   an embedded service could not be started
└── ContractError      a message that breaks the public contract where a result object cannot be
                       returned (validation itself returns Ok | Rejected, never raises)
"""


class ArusError(Exception):
    """Base of every error Arus raises on purpose."""


class ConfigError(ArusError):
    pass


class InfraError(ArusError):
    pass


class EmbeddedServiceError(InfraError):
    pass


class ContractError(ArusError):
    pass
