"""Who may do what (issue 21): API keys with a role and a tenant, tenants' quotas, the audit trail."""
