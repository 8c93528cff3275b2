"""Deployment at partner sites: keys and certificates, site data checks."""
