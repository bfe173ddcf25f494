//! Gives back every record unchanged.

use runnel_sdk::Record;

#[runnel_sdk::map]
pub fn passthrough(record: Record) -> Record {
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn returns_the_record_unchanged() {
        let record = Record::new("x").with_key("k").with_header("h", "v");
        assert_eq!(passthrough(record.clone()), record);
    }
}
