//! PostHog's automatic person properties: the device and page properties of an event that
//! its person gains, in `$set` and, as `$initial_…`, in `$set_once` (`person-property-utils.ts`,
//! notes §3), chosen in one walk of the event's sorted keys.

use serde_json::{Map, Value};

/// Event properties that PostHog copies to the person: into `$set` (unless the event sets the
/// key itself) and, as `$initial_<name>`, into `$set_once`.
pub const EVENT_TO_PERSON_PROPERTIES: [&str; 19] = [
    "$app_build",
    "$app_name",
    "$app_namespace",
    "$app_version",
    "$browser",
    "$browser_version",
    "$device_type",
    "$current_url",
    "$pathname",
    "$os",
    "$os_name",
    "$os_version",
    "$referring_domain",
    "$referrer",
    "$screen_height",
    "$screen_width",
    "$viewport_height",
    "$viewport_width",
    "$raw_user_agent",
];

/// Events whose automatic person properties are not added.
fn skips_auto_properties(event: &str) -> bool {
    matches!(event, "$snapshot" | "$performance_event")
}

/// The `$set_once` name of each of [`EVENT_TO_PERSON_PROPERTIES`], in the same order
/// (`$initial_` and the name without its `$`; `$os_name` is another name for `$os`).
const INITIAL_PERSON_PROPERTIES: [&str; 19] = [
    "$initial_app_build",
    "$initial_app_name",
    "$initial_app_namespace",
    "$initial_app_version",
    "$initial_browser",
    "$initial_browser_version",
    "$initial_device_type",
    "$initial_current_url",
    "$initial_pathname",
    "$initial_os",
    "$initial_os",
    "$initial_os_version",
    "$initial_referring_domain",
    "$initial_referrer",
    "$initial_screen_height",
    "$initial_screen_width",
    "$initial_viewport_height",
    "$initial_viewport_width",
    "$initial_raw_user_agent",
];

/// [`EVENT_TO_PERSON_PROPERTIES`] in key order, each with its place in that list.
static BY_KEY: std::sync::LazyLock<Vec<(&'static str, usize)>> = std::sync::LazyLock::new(|| {
    let mut by_key: Vec<_> = EVENT_TO_PERSON_PROPERTIES
        .into_iter()
        .enumerate()
        .map(|(index, key)| (key, index))
        .collect();
    by_key.sort_unstable();
    by_key
});

/// Each of [`EVENT_TO_PERSON_PROPERTIES`] found in `sorted`, pairs of a key and a value in key
/// order, in one walk (far fewer string comparisons than a search per name), by its place in
/// that list.
pub fn find_listed<'k, V>(
    sorted: impl Iterator<Item = (&'k str, V)>,
) -> [Option<V>; EVENT_TO_PERSON_PROPERTIES.len()] {
    let mut found = [const { None }; EVENT_TO_PERSON_PROPERTIES.len()];
    let mut sorted = sorted.peekable();
    for (key, index) in BY_KEY.iter() {
        while sorted.next_if(|(at, _)| at < key).is_some() {}
        if let Some((_, value)) = sorted.next_if(|(at, _)| at == key) {
            found[*index] = Some(value);
        }
    }
    found
}

/// The automatic person properties of an event, chosen but not yet written: for `$set` and
/// for `$set_once`, each person property with the place in [`EVENT_TO_PERSON_PROPERTIES`] of
/// the event property it comes from, and its value.
pub struct AutoProperties<'m> {
    pub set: Vec<(&'static str, usize, &'m Value)>,
    pub set_once: Vec<(&'static str, usize, &'m Value)>,
}

/// PostHog's automatic person properties of `event`: what its `$set` and `$set_once` gain. A
/// key the event sets itself is left as it set it.
pub fn auto_person_properties<'m>(
    event: &str,
    properties: &'m Map<String, Value>,
) -> AutoProperties<'m> {
    let mut auto = AutoProperties {
        set: Vec::new(),
        set_once: Vec::new(),
    };
    if skips_auto_properties(event) {
        return auto;
    }
    let is_server = properties.get("$is_server") == Some(&Value::Bool(true));
    let found = find_listed(properties.iter().map(|(k, v)| (k.as_str(), v)));
    let own = |name: &str| match properties.get(name) {
        Some(Value::Object(map)) => Some(map),
        _ => None,
    };
    let (own_set, own_set_once) = (own("$set"), own("$set_once"));
    let given =
        |own: Option<&Map<String, Value>>, key: &str| own.is_some_and(|m| m.contains_key(key));
    // `$os_name` is another name for `$os`, the one name two sources share: the first given
    // (`$os`) wins.
    let (mut os_set, mut os_set_once) = (false, false);
    auto.set.reserve(EVENT_TO_PERSON_PROPERTIES.len());
    auto.set_once.reserve(EVENT_TO_PERSON_PROPERTIES.len());
    for (index, ((key, initial), value)) in EVENT_TO_PERSON_PROPERTIES
        .into_iter()
        .zip(INITIAL_PERSON_PROPERTIES)
        .zip(found)
        .enumerate()
    {
        let Some(value) = value else {
            continue;
        };
        let person_key = if key == "$os_name" { "$os" } else { key };
        if is_server && matches!(person_key, "$os" | "$os_version") {
            continue;
        }
        let is_os = person_key == "$os";
        let (set_has_it, set_once_has_it) = (is_os && os_set, is_os && os_set_once);
        if !set_has_it && !given(own_set, person_key) {
            auto.set.push((person_key, index, value));
            os_set |= is_os;
        }
        if !value.is_null() && !set_once_has_it && !given(own_set_once, initial) {
            auto.set_once.push((initial, index, value));
            os_set_once |= is_os;
        }
    }
    auto
}

/// The automatic properties to add to `$set` and to `$set_once`, as owned maps (empty if none).
pub fn owned_auto_properties(auto: AutoProperties<'_>) -> [(&'static str, Map<String, Value>); 2] {
    let owned = |list: Vec<(&str, usize, &Value)>| -> Map<String, Value> {
        list.into_iter()
            .map(|(k, _, v)| (k.to_owned(), v.clone()))
            .collect()
    };
    [
        ("$set", owned(auto.set)),
        ("$set_once", owned(auto.set_once)),
    ]
}

/// Adds `extra` to `$set` or `$set_once` (`name`) of `properties`; answers whether that changed
/// anything.
pub fn add_to_object(
    properties: &mut Map<String, Value>,
    name: &str,
    extra: Map<String, Value>,
) -> bool {
    if extra.is_empty() {
        return false;
    }
    match properties.get_mut(name) {
        Some(Value::Object(target)) => target.extend(extra),
        _ => {
            properties.insert(name.to_owned(), Value::Object(extra));
        }
    }
    true
}

/// Adds PostHog's automatic person properties of `event` to its `$set` and `$set_once`;
/// answers whether that changed anything. The whole rule on parsed properties, for tests to
/// check against: the person step does the same and also writes the objects' text
/// (`process::add_auto_person_properties`).
#[cfg(test)]
pub fn add_auto_person_properties(event: &str, properties: &mut Map<String, Value>) -> bool {
    let extra = owned_auto_properties(auto_person_properties(event, properties));
    let mut changed = false;
    for (name, extra) in extra {
        changed |= add_to_object(properties, name, extra);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::super::tests::map;
    use super::*;
    use serde_json::json;

    #[test]
    fn auto_properties_fill_set_and_initial_set_once() {
        let mut p = map(
            json!({"$browser": "Firefox", "$os": "Linux", "$current_url": null,
            "$set": {"$browser": "Mine"}}),
        );
        add_auto_person_properties("$pageview", &mut p);
        assert_eq!(
            p["$set"],
            json!({"$browser": "Mine", "$os": "Linux", "$current_url": null})
        );
        assert_eq!(
            p["$set_once"],
            json!({"$initial_browser": "Firefox", "$initial_os": "Linux"})
        );
        for (key, initial) in EVENT_TO_PERSON_PROPERTIES
            .iter()
            .zip(INITIAL_PERSON_PROPERTIES)
        {
            let person_key = if *key == "$os_name" { "$os" } else { key };
            assert_eq!(initial, format!("$initial_{}", &person_key[1..]));
        }
        let mut both = map(json!({"$os_name": "Android", "$os": "Linux"}));
        add_auto_person_properties("e", &mut both);
        assert_eq!(both["$set"], json!({"$os": "Linux"}), "$os comes first");
        assert_eq!(both["$set_once"], json!({"$initial_os": "Linux"}));
        let mut odd = map(json!({"$os": "Linux", "$set": "not an object"}));
        assert!(add_auto_person_properties("e", &mut odd));
        assert_eq!(odd["$set"], json!({"$os": "Linux"}));
        let mut server = map(json!({"$os": "Linux", "$is_server": true}));
        add_auto_person_properties("e", &mut server);
        assert!(!server.contains_key("$set"));
    }
}
