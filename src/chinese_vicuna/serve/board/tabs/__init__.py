"""The board's tabs, one module each: ``build(board)`` lays a tab out and returns its components,
``wire(...)`` connects them to the ``Board``'s actions (and to the components of other tabs they feed)."""
