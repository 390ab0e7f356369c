"""Protocol adapters: each module translates one protocol to and from the contracts in gateway.contracts."""
