"""The HTTP routes, one module per API: ``chat`` (/v1/chat/completions), ``responses``
(/v1/responses), ``conversations`` (/v1/conversations)."""
