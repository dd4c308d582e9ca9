"""What `relay check` walks (the "test connection" button) and the outbound SPF pre-flight."""
