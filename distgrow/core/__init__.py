"""The planner's parts: splits and limits (:mod:`.split`), the growth policy (:mod:`.policy`),
and the plan of a whole run (:mod:`.plan`). :mod:`distgrow.planner` re-exports them."""
