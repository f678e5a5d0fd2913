"""OCI registries and image layouts: how releases and desired state travel as OCI artifacts."""
