"""Model card templates, shipped as ``ssm_hub.model_cards``: ``ssm_hub_model.md`` ($-placeholders, filled by
ssm_hub.conversion.publishing.push.render_model_card)."""
