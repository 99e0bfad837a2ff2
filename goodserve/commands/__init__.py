"""Sub-commands of the ``goodserve`` CLI; each module registers one (or one group)."""
