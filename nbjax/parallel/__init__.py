"""Where arrays live: meshes, collectives, several processes and the runtime set-up."""
