-- keygate key service, schema 8 (PostgreSQL): network allowlists (issue 17).
-- JSON arrays of CIDRs (`203.0.113.0/24`, `2001:db8::/32`); empty: any network.
ALTER TABLE keys ADD COLUMN allowed_networks TEXT NOT NULL DEFAULT '[]';
ALTER TABLE owners ADD COLUMN allowed_networks TEXT NOT NULL DEFAULT '[]';
