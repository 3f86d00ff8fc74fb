"""Settings, clients, migrations and embedded services. Imports only `schemas`."""
