//! Changes to the configuration file that pgtenant makes itself (`MOVE TENANT`): one value is
//! rewritten and everything else (comments, order, layout) stays as the DBA wrote it.

use toml_edit::{DocumentMut, Item, value};

/// `text` with the tenant called `tenant` placed on `shard`.
pub fn with_tenant_shard(text: &str, tenant: &str, shard: &str) -> Result<String, String> {
    let mut doc: DocumentMut = text.parse().map_err(|e| format!("{e}"))?;
    let tenants = doc
        .get_mut("tenants")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or("no [[tenants]] tables")?;
    let entry = tenants
        .iter_mut()
        .find(|t| t.get("name").and_then(Item::as_str) == Some(tenant))
        .ok_or_else(|| format!("no [[tenants]] entry named {tenant:?}"))?;
    let placement = entry
        .get_mut("placement")
        .ok_or_else(|| format!("tenant {tenant:?} has no placement"))?;
    if let Some(inline) = placement.as_inline_table_mut() {
        inline.insert("shard", shard.into());
    } else if let Some(table) = placement.as_table_mut() {
        table.insert("shard", value(shard));
    } else {
        return Err(format!("tenant {tenant:?}: placement is not a table"));
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_the_shard_of_that_tenant() {
        let text = "# top\n[[tenants]]\nname = \"acme\"\nplacement = { kind = \"shared\", shard = \"a\" }  # here\n\n[[tenants]]\nname = \"globex\"\n[tenants.placement]\nkind = \"shared\"\nshard = \"a\"\n";
        let moved = with_tenant_shard(text, "acme", "b").unwrap();
        assert_eq!(
            moved,
            text.replacen("shard = \"a\" }", "shard = \"b\" }", 1)
        );
        let moved = with_tenant_shard(text, "globex", "b").unwrap();
        assert!(
            moved.ends_with("kind = \"shared\"\nshard = \"b\"\n"),
            "{moved}"
        );
        assert!(moved.contains("shard = \"a\" }  # here"));
        assert!(with_tenant_shard(text, "initech", "b").is_err());
        assert!(with_tenant_shard("not toml [", "acme", "b").is_err());
    }
}
